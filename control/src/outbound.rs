//! The outbound address policy: where Funcatron may send a request it makes
//! on someone else's word.
//!
//! Some URLs Funcatron requests come from outside the operator's hands: the
//! fetch URL in a control message (any broker user can publish one), a
//! captured request replayed, and (later) async and flow callbacks a client
//! names. Such a request must not become a way into the operator's network
//! (server-side request forgery): by default it refuses loopback, private,
//! shared (CGNAT), link-local, cloud metadata, multicast, unspecified and
//! reserved addresses, IPv4 addresses inside IPv6 (mapped, NAT64) included.
//! The operator widens it with an allowlist of networks (`10.0.0.0/8`,
//! `127.0.0.1`) and host names (`tron.internal`, exact, any port): one flag,
//! `--allow-outbound` (`FUNCATRON_ALLOW_OUTBOUND`, comma-separated).
//!
//! The check is made where the connection is made: a [`OutboundPolicy::client`]
//! resolves names through the policy (so a name that resolves to a refused
//! address is refused after resolution, and a second lookup cannot swap the
//! address in), uses no proxy (a proxy would connect for it, unchecked) and
//! follows no redirect. URLs with an IP literal never reach a resolver:
//! [`OutboundPolicy::check_url`] checks them, and every caller calls it
//! before it sends.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use ipnet::IpNet;

/// Why an outbound request was refused, or its allowlist entry is unusable.
#[derive(Debug, thiserror::Error)]
pub enum OutboundError {
    /// The address is in a class refused by default and not allowed.
    #[error("{url}: {ip} is a {class} address, which Funcatron does not send requests to unless the operator allows it (--allow-outbound {ip})")]
    Refused {
        /// The URL asked for.
        url: String,
        /// The address it names or resolves to.
        ip: IpAddr,
        /// Which class of address (`loopback`, `private`, ...).
        class: &'static str,
    },
    /// Not a URL this policy can check.
    #[error("{url:?}: {why}")]
    BadUrl {
        /// The URL asked for.
        url: String,
        /// Why.
        why: String,
    },
    /// An allowlist entry is neither a network, an address nor a host name.
    #[error("--allow-outbound {0:?}: not a network (10.0.0.0/8), an address or a host name")]
    BadEntry(String),
}

/// Where outbound requests made for someone else may go (see the module).
#[derive(Debug, Clone, Default)]
pub struct OutboundPolicy {
    /// Networks allowed even if their class is refused.
    nets: Vec<IpNet>,
    /// Host names allowed whatever they resolve to (lower case).
    hosts: Vec<String>,
}

/// The class of `ip` if it is refused by default, `None` for a public
/// unicast address.
pub fn refused_class(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => v4_class(v4),
        IpAddr::V6(v6) => v6_class(v6),
    }
}

fn v4_class(ip: Ipv4Addr) -> Option<&'static str> {
    let [a, b, c, d] = ip.octets();
    Some(match (a, b, c, d) {
        (169, 254, 169, 254) | (100, 100, 100, 200) | (192, 0, 0, 192) => "cloud metadata",
        _ if ip.is_unspecified() || a == 0 => "unspecified",
        _ if ip.is_loopback() => "loopback",
        _ if ip.is_private() => "private",
        (100, 64..=127, _, _) => "shared (carrier-grade NAT)",
        _ if ip.is_link_local() => "link-local",
        (192, 0, 0, _) | (198, 18..=19, _, _) => "reserved",
        _ if ip.is_multicast() => "multicast",
        _ if a >= 240 => "reserved",
        _ => return None,
    })
}

fn v6_class(ip: Ipv6Addr) -> Option<&'static str> {
    if let Some(v4) = ip.to_ipv4_mapped() {
        return v4_class(v4);
    }
    let seg = ip.segments();
    // NAT64 (64:ff9b::/96) reaches the IPv4 address in its last 32 bits.
    if seg[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        let [_, _, _, _, _, _, hi, lo] = seg;
        return v4_class(Ipv4Addr::from((u32::from(hi) << 16) | u32::from(lo)));
    }
    Some(match seg[0] {
        _ if seg == [0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254] => "cloud metadata",
        _ if ip.is_unspecified() => "unspecified",
        _ if ip.is_loopback() => "loopback",
        s if s & 0xfe00 == 0xfc00 => "private",
        s if s & 0xffc0 == 0xfe80 => "link-local",
        s if s & 0xff00 == 0xff00 => "multicast",
        _ => return None,
    })
}

impl OutboundPolicy {
    /// A policy from allowlist entries: networks, addresses, host names.
    pub fn new<S: AsRef<str>>(allow: &[S]) -> Result<Self, OutboundError> {
        let mut p = OutboundPolicy::default();
        for entry in allow {
            p.allow(entry.as_ref())?;
        }
        Ok(p)
    }

    /// Allow one more entry (a network, an address or a host name).
    pub fn allow(&mut self, entry: &str) -> Result<(), OutboundError> {
        let entry = entry.trim();
        if entry.is_empty() {
            return Ok(());
        }
        if let Ok(net) = entry.parse::<IpNet>() {
            self.nets.push(net.trunc());
        } else if let Ok(ip) = entry.parse::<IpAddr>() {
            self.nets.push(IpNet::from(ip));
        } else if valid_host(entry) {
            self.hosts.push(entry.to_ascii_lowercase());
        } else {
            return Err(OutboundError::BadEntry(entry.to_owned()));
        }
        Ok(())
    }

    /// Allow the host of `url` (how a node trusts the Tron it was told
    /// to use, whatever its address).
    pub fn allow_host_of(&mut self, url: &str) -> Result<(), OutboundError> {
        let parsed = parse(url)?;
        match parsed.host() {
            Some(url::Host::Domain(d)) => self.allow(d),
            Some(url::Host::Ipv4(ip)) => self.allow(&ip.to_string()),
            Some(url::Host::Ipv6(ip)) => self.allow(&ip.to_string()),
            None => Err(bad(url, "no host")),
        }
    }

    /// The allowlist as `--allow-outbound` takes it (comma-separated),
    /// for a process this one starts.
    pub fn to_arg(&self) -> String {
        self.nets
            .iter()
            .map(ToString::to_string)
            .chain(self.hosts.iter().cloned())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// May a request go to `ip`?
    pub fn check_ip(&self, url: &str, ip: IpAddr) -> Result<(), OutboundError> {
        match refused_class(ip) {
            Some(class) if !self.nets.iter().any(|n| n.contains(&ip)) => {
                Err(OutboundError::Refused {
                    url: url.to_owned(),
                    ip,
                    class,
                })
            }
            _ => Ok(()),
        }
    }

    fn host_allowed(&self, host: &str) -> bool {
        let host = host.trim_end_matches('.');
        self.hosts.iter().any(|h| h.eq_ignore_ascii_case(host))
    }

    /// Check `url` before a request to it: an `http(s)` URL whose host is
    /// an allowed address, or a name (which [`OutboundPolicy::client`]'s
    /// resolver checks when it connects).
    pub fn check_url(&self, url: &str) -> Result<(), OutboundError> {
        let parsed = parse(url)?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(bad(url, "not an http or https URL"));
        }
        match parsed.host() {
            Some(url::Host::Ipv4(ip)) => self.check_ip(url, IpAddr::V4(ip)),
            Some(url::Host::Ipv6(ip)) => self.check_ip(url, IpAddr::V6(ip)),
            Some(url::Host::Domain(_)) => Ok(()),
            None => Err(bad(url, "no host")),
        }
    }

    /// A client that sends only where this policy allows: names resolve
    /// through it, no proxy, no redirects. `builder` carries the caller's
    /// other settings (timeouts).
    pub fn client(&self, builder: reqwest::ClientBuilder) -> reqwest::Result<reqwest::Client> {
        builder
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .dns_resolver(Arc::new(Resolver(self.clone())))
            .build()
    }
}

fn valid_host(s: &str) -> bool {
    s.len() <= 253
        && s.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

fn bad(url: &str, why: &str) -> OutboundError {
    OutboundError::BadUrl {
        url: url.to_owned(),
        why: why.to_owned(),
    }
}

fn parse(url: &str) -> Result<reqwest::Url, OutboundError> {
    reqwest::Url::parse(url).map_err(|e| bad(url, &e.to_string()))
}

/// Resolves names as the system does, then keeps only allowed addresses.
struct Resolver(OutboundPolicy);

impl reqwest::dns::Resolve for Resolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let policy = self.0.clone();
        Box::pin(async move {
            let host = name.as_str().to_owned();
            let found: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            if policy.host_allowed(&host) {
                return Ok(Box::new(found.into_iter()) as reqwest::dns::Addrs);
            }
            let mut refused = None;
            let kept: Vec<SocketAddr> = found
                .into_iter()
                .filter(|a| match policy.check_ip(&host, a.ip()) {
                    Ok(()) => true,
                    Err(e) => {
                        refused.get_or_insert(e);
                        false
                    }
                })
                .collect();
            match (kept.is_empty(), refused) {
                (true, Some(e)) => Err(Box::new(e) as Box<dyn std::error::Error + Send + Sync>),
                _ => Ok(Box::new(kept.into_iter()) as reqwest::dns::Addrs),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn every_internal_class_is_refused_and_public_addresses_are_not() {
        for (addr, class) in [
            ("127.0.0.1", "loopback"),
            ("127.9.9.9", "loopback"),
            ("::1", "loopback"),
            ("10.1.2.3", "private"),
            ("172.16.0.1", "private"),
            ("172.31.255.255", "private"),
            ("192.168.1.1", "private"),
            ("fd12::1", "private"),
            ("100.64.0.1", "shared (carrier-grade NAT)"),
            ("169.254.1.1", "link-local"),
            ("fe80::1", "link-local"),
            ("169.254.169.254", "cloud metadata"),
            ("fd00:ec2::254", "cloud metadata"),
            ("100.100.100.200", "cloud metadata"),
            ("0.0.0.0", "unspecified"),
            ("::", "unspecified"),
            ("224.0.0.1", "multicast"),
            ("255.255.255.255", "reserved"),
            ("::ffff:127.0.0.1", "loopback"),
            ("::ffff:169.254.169.254", "cloud metadata"),
            ("64:ff9b::a00:1", "private"),
        ] {
            assert_eq!(refused_class(ip(addr)), Some(class), "{addr}");
        }
        for addr in [
            "8.8.8.8",
            "1.1.1.1",
            "172.32.0.1",
            "2606:4700::1111",
            "100.128.0.1",
        ] {
            assert_eq!(refused_class(ip(addr)), None, "{addr}");
        }
    }

    #[test]
    fn the_allowlist_opens_networks_addresses_and_names() {
        let p = OutboundPolicy::new(&["10.0.0.0/8", "127.0.0.1", "Tron.Internal"]).unwrap();
        assert!(p.check_url("http://10.9.8.7:9090/v1").is_ok());
        assert!(p.check_url("http://127.0.0.1:9090/").is_ok());
        assert!(p.check_url("http://127.0.0.2:9090/").is_err());
        assert!(p.check_url("http://[::1]:9090/").is_err());
        assert!(p.host_allowed("tron.internal"));
        assert!(p.host_allowed("tron.internal."));
        assert!(!p.host_allowed("tron.internal.evil"));
        assert_eq!(p.to_arg(), "10.0.0.0/8,127.0.0.1/32,tron.internal");
        let again = OutboundPolicy::new(&p.to_arg().split(',').collect::<Vec<_>>()).unwrap();
        assert_eq!(again.to_arg(), p.to_arg());
        assert!(OutboundPolicy::new(&["10.0.0.0/33"]).is_err());
        assert!(OutboundPolicy::new(&["http://x"]).is_err());
    }

    #[test]
    fn refusals_name_the_class_and_the_flag() {
        let e = OutboundPolicy::default()
            .check_url("http://169.254.169.254/latest/meta-data/")
            .unwrap_err()
            .to_string();
        assert!(e.contains("cloud metadata"), "{e}");
        assert!(e.contains("--allow-outbound 169.254.169.254"), "{e}");
        assert!(OutboundPolicy::default()
            .check_url("file:///etc/passwd")
            .is_err());
    }

    /// A name that resolves only to refused addresses is refused when the
    /// client connects; allowed by name, the same request goes through.
    #[tokio::test]
    async fn names_are_checked_after_resolution() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            while let Ok((mut c, _)) = listener.accept().await {
                let mut buf = [0u8; 1024];
                let _ = c.read(&mut buf).await;
                let _ = c
                    .write_all(
                        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok",
                    )
                    .await;
            }
        });
        let url = format!("http://localhost:{port}/");
        let refused = OutboundPolicy::default()
            .client(reqwest::Client::builder())
            .unwrap();
        let e = refused.get(&url).send().await.unwrap_err();
        let chain = format!("{:?}", anyhow_chain(&e));
        assert!(chain.contains("loopback"), "{chain}");

        let allowed = OutboundPolicy::new(&["localhost"])
            .unwrap()
            .client(reqwest::Client::builder())
            .unwrap();
        let r = allowed.get(&url).send().await.unwrap();
        assert_eq!(r.text().await.unwrap(), "ok");
    }

    fn anyhow_chain(e: &dyn std::error::Error) -> Vec<String> {
        let mut out = vec![e.to_string()];
        let mut cur = e.source();
        while let Some(s) = cur {
            out.push(s.to_string());
            cur = s.source();
        }
        out
    }
}
