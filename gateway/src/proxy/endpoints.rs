//! The gateway's own endpoints on the public listener, compatible with the
//! original Python gateway: `GET /health` and `GET /services`; and the
//! merged API document and its page (`api_docs`, `control::api_docs`).

use bytes::Bytes;
use serde_json::{Value, json};

use std::collections::BTreeMap;

use crate::control::discovery::{Membership, Origin, SourceStatus};
use crate::control::snapshot::Snapshot;

/// An endpoint the gateway answers itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Health,
    Services,
    /// `api_docs.path`.
    ApiDocument,
    /// `api_docs.docs_path` and the page's files below it.
    ApiPage,
}

impl Endpoint {
    /// The endpoint at `path`, if any (routes may not take these paths:
    /// validation refuses it).
    pub fn at(path: &str, config: &gateway_config::Config) -> Option<Endpoint> {
        match path {
            "/health" => return Some(Endpoint::Health),
            "/services" => return Some(Endpoint::Services),
            _ => {}
        }
        let docs = config.api_docs.as_ref()?;
        if path == docs.path {
            Some(Endpoint::ApiDocument)
        } else if gateway_config::segment_prefix_of(&docs.docs_path, path) {
            Some(Endpoint::ApiPage)
        } else {
            None
        }
    }

    /// The JSON body of `/health` or `/services`.
    pub fn body(self, snapshot: &Snapshot, membership: &Membership) -> Bytes {
        let value = match self {
            Endpoint::Health => health(snapshot),
            _ => services(snapshot, &membership.statuses()),
        };
        Bytes::from(value.to_string())
    }
}

/// `{"gateway":"healthy","services":{"user-service":true,...},"overall_healthy":true}`:
/// a service is healthy while at least one instance is in rotation. Always
/// 200 while the gateway runs; the body tells the state.
fn health(snapshot: &Snapshot) -> Value {
    let services: serde_json::Map<String, Value> = snapshot
        .upstreams
        .iter()
        .map(|u| (u.name.clone(), Value::Bool(u.any_ready())))
        .collect();
    let overall = services
        .values()
        .all(|healthy| healthy == &Value::Bool(true));
    json!({
        "gateway": "healthy",
        "services": services,
        "overall_healthy": overall,
    })
}

/// Every service with its first instance as `url` (the original shape),
/// where its instances come from (`discovery`: the source, its state, the
/// age of the set) and every instance with its own state and origin.
fn services(snapshot: &Snapshot, statuses: &BTreeMap<String, SourceStatus>) -> Value {
    let services: Vec<Value> = snapshot
        .upstreams
        .iter()
        .map(|upstream| {
            let members = snapshot.membership.get(&upstream.name);
            let instances: Vec<Value> = upstream
                .instances
                .iter()
                .map(|instance| {
                    let view = instance.view();
                    let origin = members
                        .and_then(|set| set.iter().find(|i| i.socket == instance.socket))
                        .map(|i| &i.origin);
                    let mut entry = json!({
                        "address": instance.address,
                        "healthy": instance.is_ready(),
                        "status": view.status.as_str(),
                        "source": match origin {
                            Some(Origin::Registry { .. }) => "registry",
                            _ => "static",
                        },
                    });
                    if let Some(Origin::Registry { id }) = origin {
                        entry["id"] = Value::String(id.clone());
                    }
                    if let Some(error) = view.last_error {
                        entry["last_error"] = Value::String(error);
                    }
                    entry
                })
                .collect();
            json!({
                "name": upstream.name,
                "url": upstream.instances.first().map(|i| format!("http://{}", i.address)),
                "healthy": upstream.any_ready(),
                "discovery": statuses.get(&upstream.name).map_or(Value::Null, SourceStatus::to_json),
                "instances": instances,
            })
        })
        .collect();
    json!({ "services": services })
}
