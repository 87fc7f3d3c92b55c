//! Value parsers shared by both binaries' flags, so that the agent and the controller read a switch or a list item
//! from the environment the same way.

/// An on/off switch given by a flag (`--dry-run`, read as `true`) or a variable (`VCPU_DRY_RUN=1`). Takes what
/// `/etc/default` files and unit files write: `1`/`0`, `yes`/`no`, `true`/`false`, `on`/`off` (any case), and an
/// empty value for off, as in `VCPU_DRY_RUN=` left blank. Anything else is refused rather than guessed.
pub fn switch(s: &str) -> Result<bool, String> {
    match s.trim().to_ascii_lowercase().as_str() {
        "" | "0" | "n" | "no" | "f" | "false" | "off" => Ok(false),
        "1" | "y" | "yes" | "t" | "true" | "on" => Ok(true),
        _ => Err(format!("{s:?} is not on or off (1/0, yes/no, true/false, on/off)")),
    }
}

/// One item of a list flag, trimmed (`VCPU_EXCLUDE='db-*, web-*'` means `web-*`). An empty item is refused: a
/// variable that expanded to nothing, or a doubled comma, must not silently mean "nothing" or "the default".
/// `what` names the item in the error, with an example.
pub fn nonblank(s: &str, what: &str) -> Result<String, String> {
    let t = s.trim();
    if t.is_empty() {
        return Err(format!("empty {what}"));
    }
    Ok(t.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn switches() {
        for on in ["1", "yes", "TRUE", "on", " y "] {
            assert_eq!(switch(on), Ok(true), "{on:?}");
        }
        for off in ["", "0", "no", "False", "OFF", "n"] {
            assert_eq!(switch(off), Ok(false), "{off:?}");
        }
        for bad in ["maybe", "2", "-1", "yes please"] {
            assert!(switch(bad).unwrap_err().contains("not on or off"), "{bad:?}");
        }
    }

    #[test]
    fn list_items() {
        assert_eq!(nonblank(" web-* ", "pattern"), Ok("web-*".to_string()));
        assert_eq!(nonblank(" \t", "pattern (e.g. db-*)"), Err("empty pattern (e.g. db-*)".to_string()));
    }
}
