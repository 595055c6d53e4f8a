//! `ip_filter`: allows or denies the client address (as the gateway trusts
//! it, see `trusted_proxies`) by CIDR. `deny` wins; with `allow` given,
//! only addresses in it pass. Refused: `403`.
//!
//! ```yaml
//! - ip_filter: { allow: ["10.0.0.0/8", "127.0.0.1/32"], deny: ["10.6.6.0/24"] }
//! ```

use http::StatusCode;
use ipnet::IpNet;

use super::{Answer, Plugin, PluginContext, Verdict};
use crate::config::IpFilterConfig;

pub struct IpFilter {
    allow: Vec<IpNet>,
    deny: Vec<IpNet>,
}

impl IpFilter {
    pub fn new(settings: &IpFilterConfig) -> Self {
        IpFilter {
            allow: settings.allow.clone(),
            deny: settings.deny.clone(),
        }
    }

    fn allows(&self, ip: std::net::IpAddr) -> bool {
        // An IPv4 client on an IPv6 socket (::ffff:a.b.c.d) is an IPv4
        // client.
        let ip = ip.to_canonical();
        !self.deny.iter().any(|net| net.contains(&ip))
            && (self.allow.is_empty() || self.allow.iter().any(|net| net.contains(&ip)))
    }
}

impl Plugin for IpFilter {
    fn name(&self) -> &str {
        "ip_filter"
    }

    fn request_filter(&self, ctx: &mut PluginContext<'_>) -> Verdict {
        match ctx.client_addr() {
            Some(ip) if self.allows(ip) => Verdict::Continue,
            _ => Verdict::Respond(
                Answer::new(StatusCode::FORBIDDEN).with_detail("Client address not allowed"),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deny_wins_and_allow_restricts() {
        let filter = IpFilter::new(&IpFilterConfig {
            allow: vec![
                "10.0.0.0/8".parse().unwrap(),
                "127.0.0.1/32".parse().unwrap(),
            ],
            deny: vec!["10.6.6.0/24".parse().unwrap()],
        });
        for (ip, allowed) in [
            ("10.1.2.3", true),
            ("127.0.0.1", true),
            ("::ffff:10.1.2.3", true),
            ("10.6.6.6", false),
            ("192.0.2.1", false),
            ("::1", false),
        ] {
            assert_eq!(filter.allows(ip.parse().unwrap()), allowed, "{ip}");
        }
        let deny_only = IpFilter::new(&IpFilterConfig {
            allow: vec![],
            deny: vec!["192.0.2.0/24".parse().unwrap()],
        });
        assert!(deny_only.allows("198.51.100.1".parse().unwrap()));
        assert!(!deny_only.allows("192.0.2.9".parse().unwrap()));
    }
}
