//! `cors`: cross-origin requests from browsers.
//!
//! - A preflight (`OPTIONS` with `Origin` and `Access-Control-Request-Method`)
//!   is answered here and never reaches the upstream: `204` with the allow
//!   headers for an allowed origin, `403` without any CORS header for
//!   another one.
//! - Any other request from an allowed origin gets
//!   `Access-Control-Allow-Origin` (the exact origin; `*` only when every
//!   origin is allowed without credentials) on its response, and the
//!   response says `Vary: Origin`. A disallowed origin gets no CORS headers:
//!   the browser keeps the response from the page.
//!
//! ```yaml
//! - cors: { allow_origins: ["https://shop.example"], allow_methods: [GET, POST],
//!           allow_headers: [content-type, authorization], max_age: 10m }
//! ```

use http::header::{
    ACCESS_CONTROL_ALLOW_CREDENTIALS, ACCESS_CONTROL_ALLOW_HEADERS, ACCESS_CONTROL_ALLOW_METHODS,
    ACCESS_CONTROL_ALLOW_ORIGIN, ACCESS_CONTROL_EXPOSE_HEADERS, ACCESS_CONTROL_MAX_AGE,
    ACCESS_CONTROL_REQUEST_METHOD, ORIGIN, VARY,
};
use http::{HeaderValue, Method, StatusCode};
use pingora::http::ResponseHeader;

use super::{Answer, Plugin, PluginContext, Verdict};
use crate::config::CorsConfig;

pub struct Cors {
    settings: CorsConfig,
    /// The allow headers, joined once.
    methods: HeaderValue,
    headers: Option<HeaderValue>,
    expose: Option<HeaderValue>,
    max_age: Option<HeaderValue>,
}

/// The allowed origin of this request, for the response hook.
#[derive(Clone)]
struct AllowedOrigin(HeaderValue);

fn joined<T: AsRef<str>>(items: impl IntoIterator<Item = T>) -> Option<HeaderValue> {
    let text: Vec<String> = items.into_iter().map(|i| i.as_ref().to_owned()).collect();
    (!text.is_empty())
        .then(|| HeaderValue::from_str(&text.join(", ")).ok())
        .flatten()
}

impl Cors {
    pub fn new(settings: &CorsConfig) -> Self {
        Cors {
            methods: joined(settings.allow_methods.iter().map(Method::as_str))
                .unwrap_or_else(|| HeaderValue::from_static("GET, HEAD, POST")),
            headers: joined(settings.allow_headers.iter().map(|h| h.as_str())),
            expose: joined(settings.expose_headers.iter().map(|h| h.as_str())),
            max_age: settings.max_age.map(|age| HeaderValue::from(age.as_secs())),
            settings: settings.clone(),
        }
    }

    /// The value of `Access-Control-Allow-Origin` for `origin`, if allowed.
    fn allow_origin(&self, origin: &HeaderValue) -> Option<HeaderValue> {
        if self.settings.any_origin {
            return Some(if self.settings.allow_credentials {
                origin.clone()
            } else {
                HeaderValue::from_static("*")
            });
        }
        self.settings
            .allow_origins
            .iter()
            .any(|allowed| allowed.as_bytes().eq_ignore_ascii_case(origin.as_bytes()))
            .then(|| origin.clone())
    }

    /// `Vary: Origin` matters when the answer depends on the origin.
    fn varies(&self) -> bool {
        !self.settings.any_origin || self.settings.allow_credentials
    }
}

impl Plugin for Cors {
    fn name(&self) -> &str {
        "cors"
    }

    fn request_filter(&self, ctx: &mut PluginContext<'_>) -> Verdict {
        let request = ctx.request();
        let Some(origin) = request.headers.get(ORIGIN).cloned() else {
            return Verdict::Continue;
        };
        let preflight = request.method == Method::OPTIONS
            && request.headers.contains_key(ACCESS_CONTROL_REQUEST_METHOD);
        let allowed = self.allow_origin(&origin);
        if !preflight {
            if let Some(allowed) = allowed {
                ctx.extensions_mut().insert(AllowedOrigin(allowed));
            }
            return Verdict::Continue;
        }
        let Some(allowed) = allowed else {
            return Verdict::Respond(
                Answer::new(StatusCode::FORBIDDEN).with_detail("Origin not allowed"),
            );
        };
        let mut answer = Answer::new(StatusCode::NO_CONTENT)
            .with_header(ACCESS_CONTROL_ALLOW_ORIGIN, allowed)
            .with_header(ACCESS_CONTROL_ALLOW_METHODS, self.methods.clone());
        if let Some(headers) = &self.headers {
            answer = answer.with_header(ACCESS_CONTROL_ALLOW_HEADERS, headers.clone());
        }
        if let Some(age) = &self.max_age {
            answer = answer.with_header(ACCESS_CONTROL_MAX_AGE, age.clone());
        }
        if self.settings.allow_credentials {
            answer = answer.with_header(
                ACCESS_CONTROL_ALLOW_CREDENTIALS,
                HeaderValue::from_static("true"),
            );
        }
        if self.varies() {
            answer = answer.with_header(VARY, HeaderValue::from_static("Origin"));
        }
        Verdict::Respond(answer)
    }

    fn response_filter(
        &self,
        response: &mut ResponseHeader,
        ctx: &mut PluginContext<'_>,
    ) -> pingora::Result<()> {
        if response.headers.contains_key(ACCESS_CONTROL_ALLOW_ORIGIN) {
            // The preflight answer above, or the upstream's own CORS.
            return Ok(());
        }
        if ctx.request().headers.contains_key(ORIGIN) && self.varies() {
            response.append_header(VARY, "Origin")?;
        }
        let Some(AllowedOrigin(origin)) = ctx.extensions().get::<AllowedOrigin>().cloned() else {
            return Ok(());
        };
        response.insert_header(ACCESS_CONTROL_ALLOW_ORIGIN, origin)?;
        if self.settings.allow_credentials {
            response.insert_header(ACCESS_CONTROL_ALLOW_CREDENTIALS, "true")?;
        }
        if let Some(expose) = &self.expose {
            response.insert_header(ACCESS_CONTROL_EXPOSE_HEADERS, expose.clone())?;
        }
        Ok(())
    }
}
