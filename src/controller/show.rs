//! One-shot operator views: `show` samples a host twice and prints its pCPU table; bars are shared with the demo.

use std::fmt::Write as _;
use std::time::Duration;

use crate::controller::client::{AgentClient, ClientError};
use crate::controller::usage::{self, HostUsage};

/// Width of a usage bar in characters (100 %).
pub const BAR_WIDTH: usize = 20;
/// Default sampling window of `show`.
pub const DEFAULT_SHOW_WINDOW: Duration = Duration::from_secs(1);

/// A text bar for a usage in % (capped at 100).
pub fn bar(usage: f64) -> String {
    let filled = ((usage.clamp(0.0, 100.0) / 100.0) * BAR_WIDTH as f64).round() as usize;
    format!("{}{}", "█".repeat(filled), "·".repeat(BAR_WIDTH - filled))
}

/// The pCPU table: a bar per pCPU and the vCPUs on it.
pub fn table(u: &HostUsage) -> String {
    let mut s = String::new();
    for p in &u.pcpus {
        let on: Vec<String> = u
            .vcpus
            .iter()
            .filter(|v| v.pcpu == p.id)
            .map(|v| match v.usage {
                Some(x) => format!("{}/{} {:.0}%", v.domain, v.vcpu, x),
                None => format!("{}/{} ?", v.domain, v.vcpu),
            })
            .collect();
        let _ = writeln!(s, "  pCPU {:>3} |{}| {:>5.1}%  {}", p.id, bar(p.usage), p.usage, on.join(", "));
    }
    s
}

/// Samples `client`'s host twice, `window` apart, and returns the usage in between.
pub async fn sample(client: &mut AgentClient, window: Duration) -> Result<HostUsage, ClientError> {
    let a = client.get_stats().await?;
    tokio::time::sleep(window).await;
    let b = client.get_stats().await?;
    usage::compute(Some(&a), &b).map_err(|why| ClientError::Rpc {
        host: client.host().to_string(),
        method: "GetStats",
        code: tonic::Code::Unavailable,
        message: format!("could not compute usage: {}", why.as_str()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bars_scale_and_cap() {
        assert_eq!(bar(0.0).chars().filter(|&c| c == '█').count(), 0);
        assert_eq!(bar(50.0).chars().filter(|&c| c == '█').count(), BAR_WIDTH / 2);
        assert_eq!(bar(250.0).chars().filter(|&c| c == '█').count(), BAR_WIDTH);
        assert_eq!(bar(42.0).chars().count(), BAR_WIDTH);
    }
}
