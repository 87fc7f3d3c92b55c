//! What operators keep the balancer away from: excluded domains (`--exclude`, a name glob or a UUID), reserved
//! pCPUs (`--reserve-pcpus`), whether vCPUs pinned by hand may be taken back (`--override-manual`), and how many
//! vCPUs a round may move (`--max-moves`, see [`super::cap`]).
//! Pure data and matching; [`super::decide`] applies them for every policy.

use crate::model::PcpuId;

/// One `--exclude` value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DomainMatcher {
    /// A domain UUID, as agents report one (libvirt's lowercase 8-4-4-4-12 form, [`crate::hypervisor::format_uuid`]).
    Uuid(String),
    /// A glob on the domain name: `*` any run of characters, `?` one character, anything else literal.
    Glob(String),
}

impl DomainMatcher {
    /// A UUID if libvirt would read the text as one ([`crate::hypervisor::parse_uuid`]: any case, with or without
    /// dashes), otherwise a name glob. Never fails: any text is a glob. The rule is libvirt's so that a key which
    /// finds a domain by UUID in `virsh` (or in a pin to the agent) also excludes it here.
    pub fn parse(s: &str) -> DomainMatcher {
        match crate::hypervisor::parse_uuid(s) {
            Some(bytes) => DomainMatcher::Uuid(crate::hypervisor::format_uuid(&bytes)),
            None => DomainMatcher::Glob(s.to_string()),
        }
    }

    /// `uuid` is compared without regard to case: libvirt prints lowercase, but a reported UUID is not checked.
    pub fn matches(&self, name: &str, uuid: &str) -> bool {
        match self {
            DomainMatcher::Uuid(u) => uuid.eq_ignore_ascii_case(u),
            DomainMatcher::Glob(g) => glob_match(g.as_bytes(), name.as_bytes()),
        }
    }
}

/// Iterative glob match with backtracking to the last `*`: linear in practice, no recursion blow-up.
fn glob_match(pat: &[u8], s: &[u8]) -> bool {
    let (mut p, mut i) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while i < s.len() {
        if p < pat.len() && (pat[p] == b'?' || pat[p] == s[i]) {
            p += 1;
            i += 1;
        } else if p < pat.len() && pat[p] == b'*' {
            star = Some((p, i));
            p += 1;
        } else if let Some((sp, si)) = star {
            p = sp + 1;
            i = si + 1;
            star = Some((sp, si + 1));
        } else {
            return false;
        }
    }
    pat[p..].iter().all(|&c| c == b'*')
}

/// The constraints of one controller run (the same on every host).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Constraints {
    pub exclude: Vec<DomainMatcher>,
    /// Never a target; vCPUs found there are moved off when possible.
    pub reserved: Vec<PcpuId>,
    /// Take back vCPUs pinned by hand instead of leaving them where the operator put them.
    pub override_manual: bool,
    /// At most this many vCPUs moved to another pCPU per host and round (`--max-moves`); `None`: no limit.
    pub max_moves: Option<std::num::NonZeroUsize>,
}

impl Constraints {
    pub fn excludes(&self, name: &str, uuid: &str) -> bool {
        self.exclude.iter().any(|m| m.matches(name, uuid))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn globs() {
        let m = |p: &str, s: &str| DomainMatcher::parse(p).matches(s, "x");
        assert!(m("db-*", "db-01"));
        assert!(m("db-*", "db-"));
        assert!(!m("db-*", "web-db-01"));
        assert!(m("*db*", "web-db-01"));
        assert!(m("vm?", "vm1"));
        assert!(!m("vm?", "vm10"));
        assert!(m("vm1", "vm1"));
        assert!(!m("vm1", "vm10"));
        assert!(m("a*b*c", "a-x-b-y-c"));
        assert!(!m("a*b*c", "a-x-b-y-d"));
    }

    #[test]
    fn uuids_match_without_case_and_not_by_name() {
        let u = "6F1C2D3E-0000-4000-8000-00000000000A";
        let m = DomainMatcher::parse(u);
        assert!(matches!(m, DomainMatcher::Uuid(_)));
        assert!(m.matches("whatever", &u.to_ascii_lowercase()));
        assert!(!m.matches(u, "another-uuid"));
        assert!(matches!(DomainMatcher::parse("6f1c2d3e-zzzz"), DomainMatcher::Glob(_)));
    }

    /// What `virsh` accepts as this UUID excludes the domain that agents report with it; a glob that only looks
    /// hex-like stays a glob.
    #[test]
    fn uuids_in_any_form_libvirt_reads() {
        let reported = "6f1c2d3e-0000-4000-8000-00000000000a";
        let forms = [
            "6f1c2d3e00004000800000000000000a",
            "6F1C2D3E00004000800000000000000A",
            "6f1c2d3e-0000-40-00-8000-00000000000a",
        ];
        for form in forms {
            let m = DomainMatcher::parse(form);
            assert_eq!(m, DomainMatcher::Uuid(reported.to_string()), "{form}");
            assert!(m.matches("whatever", reported), "{form}");
        }
        assert!(matches!(DomainMatcher::parse("6f1c2d3e0000400080000000000000*"), DomainMatcher::Glob(_)));
        assert!(matches!(DomainMatcher::parse("6f1c2d3e00004000800000000000000"), DomainMatcher::Glob(_)));
    }

    proptest! {
        /// A pattern without wildcards matches exactly itself; `*` matches everything.
        #[test]
        fn literal_and_star(s in "[a-z0-9-]{0,12}", t in "[a-z0-9-]{0,12}") {
            prop_assert_eq!(DomainMatcher::parse(&s).matches(&t, ""), s == t);
            prop_assert!(DomainMatcher::parse("*").matches(&t, ""));
            let prefix = format!("{s}*");
            prop_assert_eq!(DomainMatcher::parse(&prefix).matches(&t, ""), t.starts_with(&s));
        }
    }
}
