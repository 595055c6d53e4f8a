//! What a configuration version decides about a request, independent of
//! how bytes move: routing, forwarding headers, the upstream (balancer,
//! timeouts, retry budget) and the plugins.

pub mod forwarding;
pub mod plugins;
pub mod routing;
pub mod upstream;
