//! Generated protobuf and gRPC code for `vcpu.v1`. Nothing outside `convert.rs`, the gRPC service and the
//! controller's client should need these types.
#![allow(clippy::all, missing_docs)]

tonic::include_proto!("vcpu.v1");

/// Encoded file descriptor set, served by gRPC reflection so `grpcurl` needs no `.proto` file.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("vcpu_v1_descriptor");
