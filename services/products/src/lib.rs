//! product-service: the catalogue, stock, and stock reservations.
//!
//! Layout:
//! - [`catalog`]: `POST /products`, `GET /products?category=`,
//!   `GET /products/{id}`, `PUT /products/{id}/stock?stock_change=N`.
//! - [`reservations`]: `POST /reservations` (all-or-nothing hold of stock for
//!   several products) and `POST /reservations/{id}/release` (its
//!   compensation), used by the order service.
//! - [`api`]: the JSON bodies of the reservation endpoints, shared with the
//!   order service so both sides agree on the wire format.
//!
//! Invariant: stock only ever changes through a single conditional `UPDATE`
//! inside the statement or transaction that needs it; never read-then-write.

use axum::Router;
use axum::routing::{get, post, put};
use service_kit::db::{self, DbError, Migration};
use sqlx::SqlitePool;

pub mod api;
pub mod catalog;
pub mod reservations;

pub const SERVICE_NAME: &str = "product-service";

/// The schema and the seed catalogue, in order; applied by [`open_db`].
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        sql: include_str!("../migrations/0001_products.sql"),
    },
    Migration {
        version: 2,
        sql: include_str!("../migrations/0002_seed.sql"),
    },
];

#[derive(Clone)]
pub struct AppState {
    pub db: SqlitePool,
}

/// Opens the product database at `path`, creating, migrating and seeding it
/// if needed.
pub async fn open_db(path: &std::path::Path) -> Result<SqlitePool, DbError> {
    db::open(path, MIGRATIONS).await
}

/// The service's routes, with the common layers and `/health`.
pub fn app(state: AppState) -> Router {
    let routes = Router::new()
        .route(
            "/products",
            get(catalog::list_products).post(catalog::create_product),
        )
        .route("/products/{id}", get(catalog::get_product))
        .route("/products/{id}/stock", put(catalog::change_stock))
        .route("/reservations", post(reservations::reserve))
        .route("/reservations/{id}/release", post(reservations::release))
        .with_state(state.clone());
    service_kit::serve::finish_router(routes, SERVICE_NAME, state.db)
}
