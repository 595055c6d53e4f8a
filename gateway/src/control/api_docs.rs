//! One OpenAPI document for the API as clients see it (`api_docs`), made
//! from every routed service's own document and served by the gateway on
//! its public listener, with a documentation page.
//!
//! Fetched on demand, never in the background (no traffic to the services
//! unless somebody reads the documentation): a request for the merged
//! document finds it stale when it was made for another version, more
//! than `api_docs.refresh` ago, or (with a service's document missing)
//! more than a few seconds ago; it then asks the task on the control
//! runtime to fetch each routed service's document (`api_docs.source` on
//! a ready instance) and waits for it at most [`FETCH_WAIT`].
//! [`merge`] rewrites it through the route table: a service path `P` is
//! what clients reach as `strip_prefix + P` (or `P` without one), kept only
//! if the route table sends that path to this route; schema names and
//! operation ids are prefixed with the service's name so that services
//! cannot collide. A service whose document cannot be fetched is listed as
//! unavailable (`x-gateway-services`) and leaves the rest intact. The
//! request path only loads the last merged bytes.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use bytes::Bytes;
use serde_json::{Map, Value, json};

use crate::control::snapshot::{CurrentSnapshot, Snapshot};

/// How soon a missing document is asked for again.
const RETRY: Duration = Duration::from_secs(3);
/// How long one service's document may take to come.
const FETCH_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a request for the merged document waits for a fresh one.
pub const FETCH_WAIT: Duration = Duration::from_secs(3);

/// What the public listener serves: the merged document and the page.
pub struct ApiDocs {
    merged: ArcSwap<Bytes>,
    /// What the merged document was made from.
    made: std::sync::Mutex<Made>,
    /// A request found the document stale.
    wanted: tokio::sync::Notify,
    /// Counts the documents made.
    made_count: tokio::sync::watch::Sender<u64>,
}

#[derive(Debug, Clone, Copy)]
struct Made {
    version: u64,
    at: Option<Instant>,
    complete: bool,
}

impl ApiDocs {
    /// Before the first fetch: a document with no paths.
    pub fn new() -> Arc<ApiDocs> {
        let empty = merge(&[], &BTreeMap::new());
        Arc::new(ApiDocs {
            merged: ArcSwap::from_pointee(Bytes::from(empty.to_string())),
            made: std::sync::Mutex::new(Made {
                version: 0,
                at: None,
                complete: false,
            }),
            wanted: tokio::sync::Notify::new(),
            made_count: tokio::sync::watch::Sender::new(0),
        })
    }

    /// The merged document for `snapshot`: made again first (waiting at
    /// most [`FETCH_WAIT`]) if it is stale.
    pub async fn document(&self, snapshot: &Snapshot) -> Bytes {
        let Some(settings) = &snapshot.config.api_docs else {
            return Bytes::clone(&self.merged.load());
        };
        let made = self.made.lock().map(|m| *m).unwrap_or(Made {
            version: 0,
            at: None,
            complete: false,
        });
        let fresh_for = if made.complete {
            settings.refresh
        } else {
            RETRY
        };
        let stale =
            made.version != snapshot.version || made.at.is_none_or(|at| at.elapsed() >= fresh_for);
        if stale {
            let mut count = self.made_count.subscribe();
            count.mark_unchanged();
            self.wanted.notify_one();
            let _ = tokio::time::timeout(FETCH_WAIT, count.changed()).await;
        }
        Bytes::clone(&self.merged.load())
    }

    /// The page's file at `tail` (what follows `docs_path`), loading the
    /// document from `document_path`: its bytes and content type.
    pub fn page_file(tail: &str, document_path: &str) -> Option<(Bytes, String)> {
        let tail = tail.trim_start_matches('/');
        let config = Arc::new(utoipa_swagger_ui::Config::from(document_path.to_owned()));
        match utoipa_swagger_ui::serve(tail, config) {
            Ok(Some(file)) => Some((Bytes::from(file.bytes.into_owned()), file.content_type)),
            _ => None,
        }
    }

    /// Keeps the merged document current, on the control runtime.
    pub fn spawn(self: &Arc<Self>, handle: &tokio::runtime::Handle, current: Arc<CurrentSnapshot>) {
        let docs = Arc::clone(self);
        handle.spawn(async move { docs.run(current).await });
    }

    async fn run(self: Arc<Self>, current: Arc<CurrentSnapshot>) {
        let http = match reqwest::Client::builder().timeout(FETCH_TIMEOUT).build() {
            Ok(http) => http,
            Err(err) => {
                tracing::error!(error = %err, "api_docs: no HTTP client; the merged document stays empty");
                return;
            }
        };
        loop {
            self.wanted.notified().await;
            let snapshot = current.load();
            let Some(settings) = &snapshot.config.api_docs else {
                continue;
            };
            let sources = fetch_all(&http, &snapshot, &settings.source).await;
            let complete = sources.values().all(|s| s.document.is_ok());
            let routes = routes_of(&snapshot);
            self.merged
                .store(Arc::new(Bytes::from(merge(&routes, &sources).to_string())));
            if let Ok(mut made) = self.made.lock() {
                *made = Made {
                    version: snapshot.version,
                    at: Some(Instant::now()),
                    complete,
                };
            }
            self.made_count.send_modify(|count| *count += 1);
        }
    }
}

/// A route as [`merge`] needs it.
#[derive(Debug, Clone)]
pub struct RouteView {
    pub prefix: String,
    pub service: String,
    pub strip_prefix: Option<String>,
}

fn routes_of(snapshot: &Snapshot) -> Vec<RouteView> {
    snapshot
        .config
        .routes
        .iter()
        .map(|route| RouteView {
            prefix: route.prefix.clone(),
            service: route.service.clone(),
            strip_prefix: route.strip_prefix.clone(),
        })
        .collect()
}

/// One service's document, or why there is none.
#[derive(Debug, Clone)]
pub struct Source {
    pub document: Result<Value, String>,
    pub fetched_at: SystemTime,
    pub instance: Option<String>,
}

/// Every routed service's document, from its first ready instance.
async fn fetch_all(
    http: &reqwest::Client,
    snapshot: &Snapshot,
    source: &str,
) -> BTreeMap<String, Source> {
    let mut out = BTreeMap::new();
    for route in &snapshot.config.routes {
        if out.contains_key(&route.service) {
            continue;
        }
        let upstream = snapshot.upstreams.iter().find(|u| u.name == route.service);
        let instance = upstream.and_then(|u| u.instances.iter().find(|i| i.is_ready()));
        let document = match instance {
            None => Err("no healthy instance".to_owned()),
            Some(instance) => fetch(http, &format!("http://{}{source}", instance.address)).await,
        };
        if let Err(why) = &document {
            tracing::debug!(service = %route.service, %why, "api_docs: no document");
        }
        out.insert(
            route.service.clone(),
            Source {
                document,
                fetched_at: SystemTime::now(),
                instance: instance.map(|i| i.address.clone()),
            },
        );
    }
    out
}

async fn fetch(http: &reqwest::Client, url: &str) -> Result<Value, String> {
    let response = http.get(url).send().await.map_err(|e| e.to_string())?;
    if !response.status().is_success() {
        return Err(format!("{url} answered {}", response.status()));
    }
    let document: Value = response.json().await.map_err(|e| e.to_string())?;
    if document["paths"].is_object() {
        Ok(document)
    } else {
        Err(format!("{url} is not an OpenAPI document"))
    }
}

/// The route (index into `routes`) that serves client path `path`: the
/// longest matching prefix, segment-wise.
fn route_for<'r>(routes: &'r [RouteView], path: &str) -> Option<&'r RouteView> {
    routes
        .iter()
        .filter(|r| gateway_config::segment_prefix_of(&r.prefix, path))
        .max_by_key(|r| r.prefix.len())
}

/// The merged document (OpenAPI 3.1).
pub fn merge(routes: &[RouteView], sources: &BTreeMap<String, Source>) -> Value {
    let mut paths = Map::new();
    let mut schemas = Map::new();
    let mut tags: Vec<Value> = Vec::new();
    let mut status = Map::new();
    for (service, source) in sources {
        let document = match &source.document {
            Ok(document) => document,
            Err(why) => {
                status.insert(
                    service.clone(),
                    json!({"available": false, "error": why, "fetched_at": rfc3339(source.fetched_at)}),
                );
                continue;
            }
        };
        status.insert(
            service.clone(),
            json!({"available": true, "instance": source.instance, "fetched_at": rfc3339(source.fetched_at)}),
        );
        let rename = |value: &Value| renamed(value, service);
        let mut reached = 0;
        if let Some(service_paths) = document["paths"].as_object() {
            for (path, item) in service_paths {
                for route in routes.iter().filter(|r| &r.service == service) {
                    let client = match &route.strip_prefix {
                        Some(strip) if path == "/" => strip.clone(),
                        Some(strip) => format!("{strip}{path}"),
                        None => path.clone(),
                    };
                    let serves = route_for(routes, &client)
                        .is_some_and(|r| r.prefix == route.prefix && &r.service == service);
                    if serves && !paths.contains_key(&client) {
                        let mut item = rename(item);
                        prefix_operation_ids(&mut item, service);
                        add_gateway_answers(&mut item);
                        paths.insert(client, item);
                        reached += 1;
                    }
                }
            }
        }
        if let Some(components) = document["components"]["schemas"].as_object() {
            for (name, schema) in components {
                schemas.insert(format!("{service}.{name}"), rename(schema));
            }
        }
        if reached > 0
            && let Some(service_tags) = document["tags"].as_array()
        {
            for tag in service_tags {
                if !tags.iter().any(|t| t["name"] == tag["name"]) {
                    tags.push(tag.clone());
                }
            }
        }
    }
    let unavailable: Vec<&String> = status
        .iter()
        .filter(|(_, s)| s["available"] == false)
        .map(|(name, _)| name)
        .collect();
    let mut description =
        "The API as clients reach it through this gateway: every routed service's own document, rewritten through the route table."
            .to_owned();
    if !unavailable.is_empty() {
        let names: Vec<&str> = unavailable.iter().map(|s| s.as_str()).collect();
        description.push_str(&format!(" Unavailable now: {}.", names.join(", ")));
    }
    schemas.insert(
        GATEWAY_ERROR.to_owned(),
        json!({
            "type": "object",
            "description": "An answer the gateway gives itself.",
            "required": ["detail"],
            "properties": {
                "detail": {"type": "string", "description": "What went wrong, for a person."},
                "request_id": {"type": "string", "description": "The request's x-request-id."},
            },
        }),
    );
    let mut document = json!({
        "openapi": "3.1.0",
        "info": {
            "title": "API gateway",
            "version": env!("CARGO_PKG_VERSION"),
            "description": description,
        },
        "paths": paths,
        "components": { "schemas": schemas },
        "x-gateway-services": status,
    });
    // Only the tags of operations that are reached (product-service's
    // `reservations` is not, through the usual routes).
    let used: Vec<&Value> = paths
        .values()
        .filter_map(Value::as_object)
        .flat_map(|item| item.values())
        .filter_map(|operation| operation["tags"].as_array())
        .flatten()
        .collect();
    tags.retain(|tag| used.contains(&&tag["name"]));
    if !tags.is_empty() {
        document["tags"] = Value::Array(tags);
    }
    document
}

/// The schema of the gateway's own answers in the merged document.
const GATEWAY_ERROR: &str = "gateway.Error";

/// What the gateway may answer for any operation before (or instead of)
/// the service: documented on every operation that does not document the
/// status itself, so that the merged document is true of what clients see.
const GATEWAY_ANSWERS: &[(&str, &str)] = &[
    (
        "400",
        "Refused at the gateway's edge: an encoded slash or backslash or a dot segment in the path, conflicting Content-Length and Transfer-Encoding, invalid header bytes",
    ),
    (
        "431",
        "The request's header is larger than the gateway takes",
    ),
    (
        "502",
        "The gateway could not reach an instance of the service",
    ),
    ("503", "No instance of the service is in rotation"),
    ("504", "The service did not answer in time"),
];

/// Adds [`GATEWAY_ANSWERS`] to every operation of `item` that lacks them.
fn add_gateway_answers(item: &mut Value) {
    const METHODS: [&str; 8] = [
        "get", "put", "post", "delete", "options", "head", "patch", "trace",
    ];
    let Some(item) = item.as_object_mut() else {
        return;
    };
    for (method, operation) in item.iter_mut() {
        if !METHODS.contains(&method.as_str()) {
            continue;
        }
        let Some(operation) = operation.as_object_mut() else {
            continue;
        };
        let responses = operation.entry("responses").or_insert_with(|| json!({}));
        let Some(responses) = responses.as_object_mut() else {
            continue;
        };
        for (status, description) in GATEWAY_ANSWERS {
            responses.entry(*status).or_insert_with(|| {
                json!({
                    "description": description,
                    "content": {"application/json": {"schema": {"$ref": format!("#/components/schemas/{GATEWAY_ERROR}")}}},
                })
            });
        }
    }
}

/// `value` with every `#/components/schemas/X` reference renamed to
/// `service.X`.
fn renamed(value: &Value, service: &str) -> Value {
    const PREFIX: &str = "#/components/schemas/";
    match value {
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(key, value)| {
                    let value = match (key.as_str(), value) {
                        ("$ref", Value::String(reference)) if reference.starts_with(PREFIX) => {
                            Value::String(format!(
                                "{PREFIX}{service}.{}",
                                &reference[PREFIX.len()..]
                            ))
                        }
                        _ => renamed(value, service),
                    };
                    (key.clone(), value)
                })
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.iter().map(|v| renamed(v, service)).collect()),
        other => other.clone(),
    }
}

fn prefix_operation_ids(item: &mut Value, service: &str) {
    if let Some(operations) = item.as_object_mut() {
        for operation in operations.values_mut() {
            if let Some(id) = operation.get("operationId").and_then(Value::as_str) {
                let id = format!("{service}.{id}");
                operation["operationId"] = Value::String(id);
            }
        }
    }
}

fn rfc3339(time: SystemTime) -> String {
    humantime::format_rfc3339_seconds(time).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(prefix: &str, service: &str, strip: Option<&str>) -> RouteView {
        RouteView {
            prefix: prefix.into(),
            service: service.into(),
            strip_prefix: strip.map(Into::into),
        }
    }

    fn source(document: Result<Value, String>) -> Source {
        Source {
            document,
            fetched_at: SystemTime::UNIX_EPOCH,
            instance: Some("127.0.0.1:1".into()),
        }
    }

    #[test]
    fn paths_are_rewritten_through_the_route_table() {
        let users = json!({
            "openapi": "3.1.0",
            "paths": {
                "/users/{id}": {"get": {"operationId": "get_user", "tags": ["users"], "responses": {"200": {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/User"}}}}}}},
                "/users": {"get": {"operationId": "list_users", "tags": ["users"]}},
                "/health": {"get": {"operationId": "health", "tags": ["health"]}},
            },
            "components": {"schemas": {"User": {"type": "object"}}},
            "tags": [{"name": "health"}, {"name": "users"}],
        });
        let routes = [
            route("/api/users", "user-service", Some("/api")),
            route("/api/products", "product-service", Some("/api")),
        ];
        let sources = BTreeMap::from([
            ("user-service".to_owned(), source(Ok(users))),
            (
                "product-service".to_owned(),
                source(Err("connection refused".into())),
            ),
        ]);
        let merged = merge(&routes, &sources);
        let paths: Vec<&String> = merged["paths"].as_object().unwrap().keys().collect();
        assert_eq!(
            paths,
            ["/api/users", "/api/users/{id}"],
            "/health is reached by no route"
        );
        let get = &merged["paths"]["/api/users/{id}"]["get"];
        assert_eq!(get["operationId"], "user-service.get_user");
        assert_eq!(
            get["responses"]["200"]["content"]["application/json"]["schema"]["$ref"],
            "#/components/schemas/user-service.User"
        );
        assert!(merged["components"]["schemas"]["user-service.User"].is_object());
        // The gateway's own answers are documented where the service's
        // document does not say.
        assert_eq!(
            get["responses"]["400"]["content"]["application/json"]["schema"]["$ref"],
            "#/components/schemas/gateway.Error"
        );
        assert!(merged["paths"]["/api/users"]["get"]["responses"]["503"].is_object());
        assert_eq!(
            merged["components"]["schemas"]["gateway.Error"]["required"],
            json!(["detail"])
        );
        assert_eq!(
            merged["tags"],
            json!([{"name": "users"}]),
            "the tag of an operation no route reaches is left out"
        );
        assert_eq!(
            merged["x-gateway-services"]["product-service"]["available"],
            false
        );
        assert_eq!(
            merged["x-gateway-services"]["user-service"]["available"],
            true
        );
        assert!(
            merged["info"]["description"]
                .as_str()
                .unwrap()
                .contains("product-service")
        );
    }

    #[test]
    fn a_longer_route_takes_its_paths() {
        let doc = json!({"paths": {"/a/b": {"get": {}}, "/a/c": {"get": {}}}});
        let routes = [route("/a", "one", None), route("/a/b", "two", None)];
        let sources = BTreeMap::from([("one".to_owned(), source(Ok(doc)))]);
        let merged = merge(&routes, &sources);
        let paths: Vec<&String> = merged["paths"].as_object().unwrap().keys().collect();
        assert_eq!(paths, ["/a/c"], "/a/b goes to service two");
    }
}
