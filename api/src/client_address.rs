//! Who is at the other end: the socket's peer address, or, when that peer is one of the
//! operator's reverse proxies (`TRUSTED_PROXIES`), the client its `X-Forwarded-For` names.
//! A header from anyone else is ignored, so a client cannot pick the address it is throttled by.
use std::net::{IpAddr, SocketAddr};

use axum::extract::{ConnectInfo, FromRequestParts};
use axum::http::request::Parts;

use crate::ip_range::{IpRange, canonical};
use crate::state::AppState;

/// The client's address; `None` when the server was not told the peer (a router driven
/// without a socket, as some tests do).
pub struct ClientAddress(pub Option<IpAddr>);

impl FromRequestParts<AppState> for ClientAddress {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let peer = parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map(|ConnectInfo(addr)| canonical(addr.ip()));
        Ok(ClientAddress(peer.map(|peer| {
            client_of(peer, &parts.headers, &state.settings.trusted_proxies)
        })))
    }
}

/// The client behind `peer`: `peer` itself unless it is a trusted proxy; then the rightmost
/// `X-Forwarded-For` entry that is not a trusted proxy (each proxy appends the address it got
/// the request from, so only entries to the right of the first untrusted one can be believed).
fn client_of(peer: IpAddr, headers: &axum::http::HeaderMap, trusted: &[IpRange]) -> IpAddr {
    let is_trusted = |ip: IpAddr| trusted.iter().any(|range| range.contains(ip));
    if !is_trusted(peer) {
        return peer;
    }
    let forwarded: Vec<&str> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .collect();
    let mut client = peer;
    for entry in forwarded.iter().rev() {
        let Ok(ip) = entry.parse::<IpAddr>().map(canonical) else {
            break;
        };
        client = ip;
        if !is_trusted(ip) {
            break;
        }
    }
    client
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().expect("an address")
    }

    #[test]
    fn forwarded_for_counts_only_behind_a_trusted_proxy() {
        let trusted: Vec<IpRange> = vec!["10.0.0.0/8".parse().expect("range")];
        let mut headers = axum::http::HeaderMap::new();
        headers.insert(
            "x-forwarded-for",
            "1.1.1.1, 203.0.113.9, 10.0.0.7".parse().expect("header"),
        );
        // From the proxy: the rightmost untrusted entry (1.1.1.1 may be forged by the client).
        assert_eq!(
            client_of(ip("10.0.0.2"), &headers, &trusted),
            ip("203.0.113.9")
        );
        // From anyone else the header is ignored.
        assert_eq!(
            client_of(ip("198.51.100.4"), &headers, &trusted),
            ip("198.51.100.4")
        );
        assert_eq!(client_of(ip("10.0.0.2"), &headers, &[]), ip("10.0.0.2"));
    }
}
