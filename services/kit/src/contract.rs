//! Keeps a service's OpenAPI document true (feature `contract`, for the
//! services' tests): every documented operation is routed, and a real
//! answer's status is documented for its operation and its body validates
//! against the documented schema (JSON Schema 2020-12, as OpenAPI 3.1
//! uses it).

use axum::Router;
use axum::http::StatusCode;
use serde_json::{Value, json};

use crate::testing::send;

/// A service's router and the document it serves.
pub struct Contract {
    app: Router,
    pub document: Value,
}

impl Contract {
    /// Reads `GET /openapi.json` of `app`; panics unless it is OpenAPI 3.1.
    pub async fn of(app: &Router) -> Contract {
        let (status, _, body) = send(app, "GET", "/openapi.json", None).await;
        assert_eq!(status, StatusCode::OK, "GET /openapi.json");
        let document: Value = serde_json::from_slice(&body).expect("the document is JSON");
        let version = document["openapi"].as_str().unwrap_or_default();
        assert!(version.starts_with("3.1."), "OpenAPI {version}");
        Contract {
            app: app.clone(),
            document,
        }
    }

    /// Every (path, method) of the document, path templates as written.
    pub fn operations(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        if let Some(paths) = self.document["paths"].as_object() {
            for (path, item) in paths {
                for method in ["get", "put", "post", "delete", "patch"] {
                    if item.get(method).is_some() {
                        out.push((path.clone(), method.to_owned()));
                    }
                }
            }
        }
        out
    }

    /// Panics unless every documented operation reaches a handler: the
    /// router's own 404 (`Not Found`) or 405 means the document names a
    /// route the service does not serve.
    pub async fn every_operation_is_routed(&self) {
        for (path, method) in self.operations() {
            let uri = fill_template(&path);
            let body = matches!(method.as_str(), "post" | "put").then_some("{}");
            let (status, _, bytes) = send(&self.app, &method.to_uppercase(), &uri, body).await;
            let detail = serde_json::from_slice::<Value>(&bytes)
                .ok()
                .and_then(|v| v["detail"].as_str().map(str::to_owned));
            assert!(
                status != StatusCode::METHOD_NOT_ALLOWED
                    && !(status == StatusCode::NOT_FOUND && detail.as_deref() == Some("Not Found")),
                "{method} {path} is documented but not routed ({status})"
            );
        }
    }

    /// Sends a request for the operation `method template` (`uri` filled
    /// in) and checks the answer against the document. Returns the status
    /// and the JSON body.
    pub async fn call(
        &self,
        method: &str,
        template: &str,
        uri: &str,
        body: Option<&str>,
    ) -> (StatusCode, Value) {
        let (status, _, bytes) = send(&self.app, method, uri, body).await;
        let body: Value = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| panic!("{method} {uri}: the answer is not JSON"))
        };
        self.check(method, template, status, &body);
        (status, body)
    }

    /// Panics unless `status` is documented for the operation and `body`
    /// validates against its schema.
    pub fn check(&self, method: &str, template: &str, status: StatusCode, body: &Value) {
        let operation = &self.document["paths"][template][method.to_lowercase()];
        assert!(
            operation.is_object(),
            "{method} {template} is not in the document"
        );
        let response = &operation["responses"][status.as_str()];
        assert!(
            response.is_object(),
            "{method} {template} answered {status}, which the document does not list: {body}"
        );
        let Some(schema) = response["content"]["application/json"].get("schema") else {
            panic!("{method} {template} {status}: no JSON schema documented");
        };
        let validator = self.validator(schema, &format!("{method} {template} {status}"));
        let errors: Vec<String> = validator.iter_errors(body).map(|e| e.to_string()).collect();
        assert!(
            errors.is_empty(),
            "{method} {template} {status}: the answer does not match the document: {errors:?}\n{body}"
        );
    }
}

impl Contract {
    /// Whether `body` fits the documented request body of `method
    /// template`: what a client reading the document may send.
    pub fn request_fits(&self, method: &str, template: &str, body: &Value) -> bool {
        let operation = &self.document["paths"][template][method.to_lowercase()];
        let Some(schema) = operation["requestBody"]["content"]["application/json"].get("schema")
        else {
            panic!("{method} {template}: no JSON request body documented");
        };
        self.validator(schema, &format!("{method} {template} request"))
            .is_valid(body)
    }

    /// Sends each body to `method path` (an operation without path
    /// parameters) and panics unless the document admits exactly the
    /// bodies the handler creates (201). Returns how many fitted and how
    /// many did not.
    pub async fn admits_exactly_what_it_creates(
        &self,
        method: &str,
        path: &str,
        bodies: impl IntoIterator<Item = String>,
    ) -> (usize, usize) {
        let (mut fitted, mut refused) = (0, 0);
        for body in bodies {
            let value: Value = serde_json::from_str(&body).expect("a JSON test body");
            let fits = self.request_fits(method, path, &value);
            let (status, answer) = self.call(method, path, path, Some(&body)).await;
            assert_eq!(
                fits,
                status == StatusCode::CREATED,
                "{body}: the document says {}, the handler answered {status} {answer}",
                if fits { "fits" } else { "does not fit" }
            );
            if fits {
                fitted += 1;
            } else {
                refused += 1;
            }
        }
        (fitted, refused)
    }

    /// A validator of `schema`, with the document's components to refer to.
    fn validator(&self, schema: &Value, what: &str) -> jsonschema::Validator {
        let mut root = schema.clone();
        if let Some(object) = root.as_object_mut() {
            object.insert("components".into(), self.document["components"].clone());
        } else {
            root = json!({ "allOf": [schema], "components": self.document["components"] });
        }
        jsonschema::draft202012::options()
            .should_validate_formats(true)
            .build(&root)
            .unwrap_or_else(|err| panic!("{what}: bad schema: {err}"))
    }
}

/// `/users/{id}` → `/users/1`.
fn fill_template(path: &str) -> String {
    let mut out = String::new();
    let mut rest = path;
    while let Some(start) = rest.find('{') {
        out.push_str(&rest[..start]);
        out.push('1');
        rest = rest[start..]
            .find('}')
            .map_or("", |end| &rest[start + end + 1..]);
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn contract() -> Contract {
        Contract {
            app: Router::new(),
            document: json!({
                "openapi": "3.1.0",
                "paths": {"/things/{id}": {"get": {"responses": {"200": {"content": {"application/json": {
                    "schema": {"$ref": "#/components/schemas/Thing"}}}}}}}},
                "components": {"schemas": {"Thing": {
                    "type": "object", "required": ["id"],
                    "properties": {"id": {"type": "integer"}}}}}
            }),
        }
    }

    #[test]
    fn a_matching_answer_passes() {
        contract().check("GET", "/things/{id}", StatusCode::OK, &json!({"id": 1}));
        assert_eq!(fill_template("/a/{x}/b/{y}"), "/a/1/b/1");
    }

    #[test]
    #[should_panic(expected = "does not match the document")]
    fn a_body_of_another_shape_fails() {
        contract().check("GET", "/things/{id}", StatusCode::OK, &json!({"id": "one"}));
    }

    #[test]
    #[should_panic(expected = "which the document does not list")]
    fn an_undocumented_status_fails() {
        contract().check("GET", "/things/{id}", StatusCode::NOT_FOUND, &json!({}));
    }
}
