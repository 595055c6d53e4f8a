//! Route lookup: longest path prefix on segment boundaries, and prefix
//! stripping.
//!
//! `/api/users` matches `/api/users` and `/api/users/7`, never
//! `/api/usersX`. Nested prefixes are allowed; the longest wins. Lookup
//! walks a short list sorted longest-first and allocates nothing.

use crate::config::segment_prefix_of;

/// Routes of one configuration version, longest prefix first.
#[derive(Debug)]
pub struct RouteTable<R> {
    routes: Vec<(String, R)>,
}

impl<R> RouteTable<R> {
    pub fn new(routes: impl IntoIterator<Item = (String, R)>) -> Self {
        let mut routes: Vec<(String, R)> = routes.into_iter().collect();
        // Stable: among equal lengths (distinct prefixes) file order stays.
        routes.sort_by_key(|(prefix, _)| std::cmp::Reverse(prefix.len()));
        Self { routes }
    }

    /// The route whose prefix is the longest segment-prefix of `path`.
    pub fn lookup(&self, path: &str) -> Option<&R> {
        self.routes
            .iter()
            .find(|(prefix, _)| segment_prefix_of(prefix, path))
            .map(|(_, route)| route)
    }

    /// The route with exactly this prefix.
    pub fn lookup_prefix(&self, prefix: &str) -> Option<&R> {
        self.routes
            .iter()
            .find(|(own, _)| own == prefix)
            .map(|(_, route)| route)
    }

    /// Every route, longest prefix first.
    pub fn iter(&self) -> impl Iterator<Item = &R> {
        self.routes.iter().map(|(_, route)| route)
    }
}

/// `path` without `strip` (which must be a segment-prefix of it), never
/// empty: stripping `/api` from `/api` gives `/`.
pub fn strip_prefix<'a>(path: &'a str, strip: &str) -> &'a str {
    match path.strip_prefix(strip) {
        Some("") => "/",
        Some(rest) if rest.starts_with('/') => rest,
        // Not a segment boundary (validation prevents it): leave the path.
        _ => path,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> RouteTable<&'static str> {
        RouteTable::new([
            ("/api".to_owned(), "api"),
            ("/api/users".to_owned(), "users"),
            ("/api/users/admin".to_owned(), "admin"),
        ])
    }

    #[test]
    fn longest_segment_prefix_wins() {
        let t = table();
        assert_eq!(t.lookup("/api/users"), Some(&"users"));
        assert_eq!(t.lookup("/api/users/7"), Some(&"users"));
        assert_eq!(t.lookup("/api/users/admin/x"), Some(&"admin"));
        assert_eq!(t.lookup("/api/usersX"), Some(&"api"));
        assert_eq!(t.lookup("/api/"), Some(&"api"));
        assert_eq!(t.lookup("/apiX"), None);
        assert_eq!(t.lookup("/"), None);
        assert_eq!(t.lookup_prefix("/api/users"), Some(&"users"));
        assert_eq!(t.lookup_prefix("/api/users/7"), None);
        let root = RouteTable::new([("/".to_owned(), "root")]);
        assert_eq!(root.lookup("/anything/at/all"), Some(&"root"));
    }

    #[test]
    fn stripping_keeps_a_leading_slash() {
        assert_eq!(strip_prefix("/api/users/7", "/api"), "/users/7");
        assert_eq!(strip_prefix("/api", "/api"), "/");
        assert_eq!(strip_prefix("/api/", "/api"), "/");
        assert_eq!(strip_prefix("/apix", "/api"), "/apix");
    }
}
