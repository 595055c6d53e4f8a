//! `headers`: sets and removes request headers (towards the upstream) and
//! response headers (towards the client).
//!
//! ```yaml
//! plugins:
//!   - headers:
//!       request:  { set: { x-team: shop }, remove: [cookie] }
//!       response: { set: { cache-control: no-store }, remove: [server] }
//! ```

use pingora::http::{RequestHeader, ResponseHeader};

use super::{Plugin, PluginContext};
use crate::config::HeadersPluginConfig;

pub struct Headers {
    settings: HeadersPluginConfig,
}

impl Headers {
    pub fn new(settings: HeadersPluginConfig) -> Self {
        Self { settings }
    }
}

impl Plugin for Headers {
    fn name(&self) -> &'static str {
        "headers"
    }

    fn upstream_request_filter(
        &self,
        request: &mut RequestHeader,
        _ctx: &mut PluginContext<'_>,
    ) -> pingora::Result<()> {
        let edits = &self.settings.request;
        for name in &edits.remove {
            request.remove_header(name);
        }
        for (name, value) in &edits.set {
            request.insert_header(name.clone(), value.clone())?;
        }
        Ok(())
    }

    fn response_filter(
        &self,
        response: &mut ResponseHeader,
        _ctx: &mut PluginContext<'_>,
    ) -> pingora::Result<()> {
        let edits = &self.settings.response;
        for name in &edits.remove {
            response.remove_header(name);
        }
        for (name, value) in &edits.set {
            response.insert_header(name.clone(), value.clone())?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::HeaderEdits;
    use http::{HeaderName, HeaderValue};

    #[test]
    fn sets_and_removes_on_both_sides() {
        let edits = HeaderEdits {
            set: vec![(
                HeaderName::from_static("x-a"),
                HeaderValue::from_static("1"),
            )],
            remove: vec![HeaderName::from_static("cookie")],
        };
        let plugin = Headers::new(HeadersPluginConfig {
            request: edits.clone(),
            response: edits,
        });
        let mut request = RequestHeader::build("GET", b"/", None).unwrap();
        request.insert_header("cookie", "secret").unwrap();
        request.insert_header("x-a", "old").unwrap();
        let client = RequestHeader::build("GET", b"/", None).unwrap();
        let mut extensions = http::Extensions::new();
        let mut ctx = PluginContext::new(&client, "rid", None, "/", "svc", &mut extensions);
        plugin
            .upstream_request_filter(&mut request, &mut ctx)
            .unwrap();
        assert!(request.headers.get("cookie").is_none());
        assert_eq!(request.headers.get_all("x-a").iter().count(), 1);
        assert_eq!(request.headers["x-a"], "1");

        let mut response = ResponseHeader::build(200, None).unwrap();
        response.insert_header("cookie", "x").unwrap();
        plugin.response_filter(&mut response, &mut ctx).unwrap();
        assert!(response.headers.get("cookie").is_none());
        assert_eq!(response.headers["x-a"], "1");
    }
}
