//! One address or a CIDR range (`TRUSTED_PROXIES`), and the one form addresses are compared in.
use std::net::IpAddr;
use std::str::FromStr;

/// One address, or a CIDR range (`10.0.0.0/8`, `fd00::/8`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpRange {
    network: IpAddr,
    prefix: u8,
}

impl IpRange {
    pub fn contains(&self, ip: IpAddr) -> bool {
        let (net, ip, width) = match (self.network, canonical(ip)) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                (u32::from(net) as u128, u32::from(ip) as u128, 32)
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => (u128::from(net), u128::from(ip), 128),
            _ => return false,
        };
        let prefix = u32::from(self.prefix);
        if prefix == 0 {
            return true;
        }
        let shift = width - prefix;
        (net >> shift) == (ip >> shift)
    }
}

impl FromStr for IpRange {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let text = text.trim();
        let (address, prefix) = match text.split_once('/') {
            Some((address, prefix)) => (address, Some(prefix)),
            None => (text, None),
        };
        let network = address
            .parse::<IpAddr>()
            .map(canonical)
            .map_err(|_| format!("{text:?} is not an IP address or CIDR range"))?;
        let width = if network.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => width,
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= width)
                .ok_or_else(|| format!("{text:?} has no valid prefix length"))?,
        };
        Ok(IpRange { network, prefix })
    }
}

/// IPv4-mapped IPv6 addresses (`::ffff:1.2.3.4`) compare as the IPv4 address they carry.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().expect("an address")
    }

    #[test]
    fn ranges_hold_their_addresses_only() {
        let net: IpRange = "10.1.0.0/16".parse().expect("range");
        assert!(net.contains(ip("10.1.200.3")));
        assert!(net.contains(ip("::ffff:10.1.0.1")));
        assert!(!net.contains(ip("10.2.0.1")));
        let one: IpRange = "::1".parse().expect("address");
        assert!(one.contains(ip("::1")) && !one.contains(ip("::2")));
        assert!("10.0.0.0/33".parse::<IpRange>().is_err());
        assert!("proxy.local".parse::<IpRange>().is_err());
    }
}
