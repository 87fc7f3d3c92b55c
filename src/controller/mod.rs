//! Controller (being written).
