//! user-service: registers users and looks them up.
//!
//! `POST /users`, `GET /users`, `GET /users/{id}`, `GET /health`. Data lives
//! in the service's own SQLite file; see `migrations/`.

use axum::Router;
use axum::extract::RawQuery;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use rusqlite::OptionalExtension;
use serde::{Deserialize, Serialize};
use service_kit::db::{self, Db, DbError, Migration};
use service_kit::extract::{Json, Path, Query};
use service_kit::openapi::{ErrorBody, PageParams};
use service_kit::page::Page;
use service_kit::{AppError, AppResult};
use utoipa::{OpenApi, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

pub const SERVICE_NAME: &str = "user-service";

/// The schema, in order; applied at start-up by [`open_db`].
pub const MIGRATIONS: &[Migration] = &[Migration {
    version: 1,
    sql: include_str!("../migrations/0001_users.sql"),
}];

/// Longest username accepted.
const MAX_USERNAME_CHARS: usize = 50;
/// Longest e-mail address a mail system accepts (RFC 5321 path limit).
const MAX_EMAIL_CHARS: usize = 254;
/// Longest full name accepted; generous for any real name.
const MAX_FULL_NAME_CHARS: usize = 200;

#[derive(Clone)]
pub struct AppState {
    pub db: Db,
}

/// Opens the user database at `path`, creating and migrating it if needed.
pub async fn open_db(path: &std::path::Path) -> Result<Db, DbError> {
    db::open(path, MIGRATIONS).await
}

/// The service's routes, with the common layers, `/health`, `/metrics`,
/// `/openapi.json` and `/docs`.
pub fn app(state: AppState) -> Router {
    let db = state.db.clone();
    service_kit::serve::finish_router(routes(state), SERVICE_NAME, db)
}

/// The service's own routes and their document.
fn routes(state: AppState) -> OpenApiRouter {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(list_users, create_user))
        .routes(routes!(get_user))
        .with_state(state)
}

#[derive(OpenApi)]
#[openapi(
    info(title = "user-service", description = "Registers users and looks them up."),
    tags((name = "users", description = "User accounts")),
)]
struct ApiDoc;

/// A new user. Lengths count the characters as sent; the handler trims
/// surrounding white space (Unicode `White_Space`, the class the patterns
/// spell out) before it checks the rest and stores the value.
#[derive(Debug, Deserialize, ToSchema)]
pub struct NewUser {
    /// ASCII letters and digits, `_`, `-` and `.`.
    #[schema(
        min_length = 1,
        max_length = 50,
        pattern = r"^[\t\n\x0B\f\r \x85\xA0\u1680\u2000-\u200A\u2028\u2029\u202F\u205F\u3000]*[A-Za-z0-9_.-]+[\t\n\x0B\f\r \x85\xA0\u1680\u2000-\u200A\u2028\u2029\u202F\u205F\u3000]*$",
        example = "john_doe"
    )]
    pub username: String,
    /// `local@domain.tld`: one `@`, no white space, a dotted domain.
    #[schema(
        max_length = 254,
        pattern = r"^[\t\n\x0B\f\r \x85\xA0\u1680\u2000-\u200A\u2028\u2029\u202F\u205F\u3000]*[^@\t\n\x0B\f\r \x85\xA0\u1680\u2000-\u200A\u2028\u2029\u202F\u205F\u3000]+@[^@.\t\n\x0B\f\r \x85\xA0\u1680\u2000-\u200A\u2028\u2029\u202F\u205F\u3000]+(\.[^@.\t\n\x0B\f\r \x85\xA0\u1680\u2000-\u200A\u2028\u2029\u202F\u205F\u3000]+)+[\t\n\x0B\f\r \x85\xA0\u1680\u2000-\u200A\u2028\u2029\u202F\u205F\u3000]*$",
        example = "john@example.com"
    )]
    pub email: String,
    /// Not only white space.
    #[schema(
        min_length = 1,
        max_length = 200,
        pattern = r"[^\t\n\x0B\f\r \x85\xA0\u1680\u2000-\u200A\u2028\u2029\u202F\u205F\u3000]",
        example = "John Doe"
    )]
    pub full_name: String,
}

#[derive(Debug, Serialize, Deserialize, PartialEq, Eq, ToSchema)]
pub struct User {
    pub id: i64,
    pub username: String,
    pub email: String,
    pub full_name: String,
    pub is_active: bool,
}

impl User {
    /// A row of `user_columns!()`.
    fn from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<Self> {
        service_kit::db::check_columns(row, &["id", "username", "email", "full_name", "is_active"]);
        Ok(User {
            id: row.get(0)?,
            username: row.get(1)?,
            email: row.get(2)?,
            full_name: row.get(3)?,
            is_active: row.get(4)?,
        })
    }
}

/// The columns [`User::from_row`] reads, for `concat!`: every statement's
/// text is a constant, built without an allocation per request.
macro_rules! user_columns {
    () => {
        "id, username, email, full_name, is_active"
    };
}

impl NewUser {
    /// Checks the lengths as sent, then trims the fields and checks what
    /// is left; the first problem is a 422.
    fn validated(self) -> AppResult<NewUser> {
        let too_long = |s: &str, max| s.chars().count() > max;
        let username = self.username.trim();
        let email = self.email.trim();
        let full_name = self.full_name.trim();
        let username_ok = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.');
        if username.is_empty() || too_long(&self.username, MAX_USERNAME_CHARS) {
            return Err(AppError::unprocessable(format!(
                "username must be 1 to {MAX_USERNAME_CHARS} characters"
            )));
        }
        if !username.chars().all(username_ok) {
            return Err(AppError::unprocessable(
                "username may contain only ASCII letters, digits, '_', '-' and '.'",
            ));
        }
        if too_long(&self.email, MAX_EMAIL_CHARS) || !is_plausible_email(email) {
            return Err(AppError::unprocessable(
                "email is not a valid e-mail address",
            ));
        }
        if full_name.is_empty() || too_long(&self.full_name, MAX_FULL_NAME_CHARS) {
            return Err(AppError::unprocessable(format!(
                "full_name must be 1 to {MAX_FULL_NAME_CHARS} characters"
            )));
        }
        Ok(NewUser {
            username: username.to_owned(),
            email: email.to_owned(),
            full_name: full_name.to_owned(),
        })
    }
}

/// `local@domain.tld`: one `@`, a non-empty local part, a dotted domain, no
/// spaces. Deliverability is the mail system's business, not ours.
fn is_plausible_email(email: &str) -> bool {
    let Some((local, domain)) = email.split_once('@') else {
        return false;
    };
    !local.is_empty()
        && !domain.contains('@')
        && !email.chars().any(char::is_whitespace)
        && domain.split('.').count() >= 2
        && domain.split('.').all(|label| !label.is_empty())
}

/// Registers a user.
#[utoipa::path(
    post,
    path = "/users",
    tag = "users",
    request_body = NewUser,
    responses(
        (status = 201, description = "Registered", body = User),
        (status = 400, description = "Malformed JSON", body = ErrorBody),
        (status = 409, description = "Username or email already exists", body = ErrorBody),
        (status = 413, description = "Body over 1 MiB", body = ErrorBody),
        (status = 422, description = "A field is missing, of the wrong type or out of bounds", body = ErrorBody),
        (status = 503, description = "Database unavailable", body = ErrorBody),
    )
)]
async fn create_user(
    State(state): State<AppState>,
    Json(new_user): Json<NewUser>,
) -> AppResult<(StatusCode, Json<User>)> {
    let new_user = new_user.validated()?;
    let insert = state.db.write(move |conn| {
        let inserted = conn
            .prepare_cached(concat!(
                "INSERT INTO users (username, email, full_name) VALUES (?, ?, ?) RETURNING ",
                user_columns!()
            ))?
            .query_row(
                (&new_user.username, &new_user.email, &new_user.full_name),
                User::from_row,
            );
        match inserted {
            Ok(user) => Ok(user),
            Err(err) if db::is_unique_violation(&err, "users.username") => {
                Err(AppError::conflict("Username already exists"))
            }
            Err(err) if db::is_unique_violation(&err, "users.email") => {
                Err(AppError::conflict("Email already exists"))
            }
            Err(err) => Err(err.into()),
        }
    });
    let user = service_kit::metrics::timed(SERVICE_NAME, "user_insert", insert).await?;
    users_created().inc();
    Ok((StatusCode::CREATED, Json(user)))
}

/// The users, in id order, a page at a time.
#[utoipa::path(
    get,
    path = "/users",
    tag = "users",
    params(PageParams),
    responses(
        (status = 200, description = "One page of users", body = Vec<User>,
         headers(("link" = String, description = "`<?...&after_id=N>; rel=\"next\"` when another page may follow (a query-only reference)"))),
        (status = 422, description = "`limit` or `after_id` out of bounds", body = ErrorBody),
        (status = 503, description = "Database unavailable", body = ErrorBody),
    )
)]
async fn list_users(
    State(state): State<AppState>,
    Query(list): Query<PageParams>,
    RawQuery(query): RawQuery,
) -> AppResult<Response> {
    let page = Page::new(list.limit, list.after_id)?;
    let users = state.db.read(|conn| {
        conn.prepare_cached(concat!(
            "SELECT ",
            user_columns!(),
            " FROM users WHERE id > ? ORDER BY id LIMIT ?"
        ))?
        .query_map((page.after_id, page.fetch()), User::from_row)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(AppError::from)
    })?;
    Ok(page.answer(users, |user| user.id, query.as_deref()))
}

/// One user.
#[utoipa::path(
    get,
    path = "/users/{id}",
    tag = "users",
    params(("id" = i64, Path, description = "The user's id")),
    responses(
        (status = 200, description = "The user", body = User),
        (status = 404, description = "No such user", body = ErrorBody),
        (status = 422, description = "The id is not an integer", body = ErrorBody),
        (status = 503, description = "Database unavailable", body = ErrorBody),
    )
)]
async fn get_user(State(state): State<AppState>, Path(id): Path<i64>) -> AppResult<Json<User>> {
    let user = service_kit::metrics::time(SERVICE_NAME, "user_get", || {
        state.db.read(|conn| {
            conn.prepare_cached(concat!(
                "SELECT ",
                user_columns!(),
                " FROM users WHERE id = ?"
            ))?
            .query_row([id], User::from_row)
            .optional()
            .map_err(AppError::from)
        })
    })?;
    Ok(Json(
        user.ok_or_else(|| AppError::not_found("User not found"))?,
    ))
}

/// `users_created_total`.
fn users_created() -> &'static prometheus::IntCounter {
    static COUNTER: std::sync::OnceLock<prometheus::IntCounter> = std::sync::OnceLock::new();
    COUNTER.get_or_init(|| {
        service_kit::metrics::counter("users_created_total", "Users created.", &[])
            .with_label_values::<&str>(&[])
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn email_plausibility() {
        for good in ["john@example.com", "a.b+c@mail.example.org"] {
            assert!(is_plausible_email(good), "{good}");
        }
        for bad in [
            "",
            "john",
            "@example.com",
            "john@",
            "john@localhost",
            "a@b@c.d",
            "a b@c.d",
            "a@b..c",
        ] {
            assert!(!is_plausible_email(bad), "{bad}");
        }
    }
}
