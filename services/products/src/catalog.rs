//! The catalogue: creating, listing and reading products, and changing stock.

use axum::extract::{RawQuery, State};
use axum::http::StatusCode;
use axum::response::Response;
use rusqlite::OptionalExtension;
use serde::{Deserialize, Serialize};
use service_kit::extract::{Json, Path, Query};
use service_kit::money::Money;
use service_kit::openapi::ErrorBody;
use service_kit::page::Page;
use service_kit::{AppError, AppResult};
use utoipa::{IntoParams, ToSchema};

use crate::AppState;

/// Largest stock a product may hold. Keeps `stock + change` far from
/// SQLite's integer overflow (which would silently turn it into a float).
pub const MAX_STOCK: i64 = 1_000_000_000;
/// Longest product name and category accepted.
const MAX_NAME_CHARS: usize = 200;
/// Longest description accepted.
const MAX_DESCRIPTION_CHARS: usize = 5_000;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Product {
    pub id: i64,
    pub name: String,
    pub description: Option<String>,
    pub price: Money,
    pub stock: i64,
    pub category: String,
}

/// The columns [`Product::from_row`] reads, for `concat!`: every
/// statement's text is a constant, built without an allocation per request.
macro_rules! product_columns {
    () => {
        "id, name, description, price_cents, stock, category"
    };
}

impl Product {
    /// A row of `product_columns!()`.
    pub(crate) fn from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<Self> {
        service_kit::db::check_columns(
            row,
            &[
                "id",
                "name",
                "description",
                "price_cents",
                "stock",
                "category",
            ],
        );
        Ok(Product {
            id: row.get(0)?,
            name: row.get(1)?,
            description: row.get(2)?,
            price: Money::from_cents(row.get(3)?),
            stock: row.get(4)?,
            category: row.get(5)?,
        })
    }
}

/// A new product. Lengths count the characters as sent; the handler trims
/// surrounding white space (Unicode `White_Space`, the class the patterns
/// spell out) before it stores the text.
#[derive(Debug, Deserialize, ToSchema)]
pub struct NewProduct {
    /// Not only white space.
    #[schema(
        min_length = 1,
        max_length = 200,
        pattern = r"[^\t\n\x0B\f\r \x85\xA0\u1680\u2000-\u200A\u2028\u2029\u202F\u205F\u3000]",
        example = "Laptop"
    )]
    pub name: String,
    #[serde(default)]
    #[schema(max_length = 5000)]
    pub description: Option<String>,
    /// Not negative; at most two decimals.
    #[schema(value_type = f64, minimum = 0, maximum = 10_000_000_000_i64, multiple_of = 0.01)]
    pub price: Money,
    #[serde(deserialize_with = "service_kit::number::integer")]
    #[schema(minimum = 0, maximum = 1_000_000_000)]
    pub stock: i64,
    /// Not only white space.
    #[schema(
        min_length = 1,
        max_length = 200,
        pattern = r"[^\t\n\x0B\f\r \x85\xA0\u1680\u2000-\u200A\u2028\u2029\u202F\u205F\u3000]",
        example = "Electronics"
    )]
    pub category: String,
}

impl NewProduct {
    fn validated(self) -> AppResult<NewProduct> {
        // The length as sent, the text trimmed.
        let length_ok = |s: &str, max| !s.trim().is_empty() && s.chars().count() <= max;
        if !length_ok(&self.name, MAX_NAME_CHARS) {
            return Err(AppError::unprocessable(format!(
                "name must be 1 to {MAX_NAME_CHARS} characters"
            )));
        }
        if !length_ok(&self.category, MAX_NAME_CHARS) {
            return Err(AppError::unprocessable(format!(
                "category must be 1 to {MAX_NAME_CHARS} characters"
            )));
        }
        if self
            .description
            .as_deref()
            .is_some_and(|d| d.chars().count() > MAX_DESCRIPTION_CHARS)
        {
            return Err(AppError::unprocessable(format!(
                "description must be at most {MAX_DESCRIPTION_CHARS} characters"
            )));
        }
        if self.price < Money::ZERO {
            return Err(AppError::unprocessable("price must not be negative"));
        }
        if !(0..=MAX_STOCK).contains(&self.stock) {
            return Err(AppError::unprocessable(format!(
                "stock must be between 0 and {MAX_STOCK}"
            )));
        }
        Ok(NewProduct {
            name: self.name.trim().to_owned(),
            description: self.description.map(|d| d.trim().to_owned()),
            category: self.category.trim().to_owned(),
            ..self
        })
    }
}

/// Adds a product to the catalogue.
#[utoipa::path(
    post,
    path = "/products",
    tag = "products",
    request_body = NewProduct,
    responses(
        (status = 201, description = "Created", body = Product),
        (status = 400, description = "Malformed JSON", body = ErrorBody),
        (status = 413, description = "Body over 1 MiB", body = ErrorBody),
        (status = 422, description = "A field is missing, of the wrong type or out of bounds", body = ErrorBody),
        (status = 503, description = "Database unavailable", body = ErrorBody),
    )
)]
pub async fn create_product(
    State(state): State<AppState>,
    Json(new_product): Json<NewProduct>,
) -> AppResult<(StatusCode, Json<Product>)> {
    let p = new_product.validated()?;
    let product = state
        .db
        .write(move |conn| {
            conn.prepare_cached(concat!(
                "INSERT INTO products (name, description, price_cents, stock, category)
                 VALUES (?, ?, ?, ?, ?) RETURNING ",
                product_columns!()
            ))?
            .query_row(
                (
                    &p.name,
                    &p.description,
                    p.price.cents(),
                    p.stock,
                    &p.category,
                ),
                Product::from_row,
            )
            .map_err(AppError::from)
        })
        .await?;
    Ok((StatusCode::CREATED, Json(product)))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListFilter {
    /// Only products of this category, compared case-insensitively.
    pub category: Option<String>,
    /// Most items in the answer (default 100).
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<i64>,
    /// Only products whose id is above this one (the previous page's last).
    #[param(minimum = 0)]
    pub after_id: Option<i64>,
}

/// The catalogue, in id order, a page at a time.
#[utoipa::path(
    get,
    path = "/products",
    tag = "products",
    params(ListFilter),
    responses(
        (status = 200, description = "One page of products", body = Vec<Product>,
         headers(("link" = String, description = "`<?...&after_id=N>; rel=\"next\"` when another page may follow (a query-only reference)"))),
        (status = 422, description = "`limit` or `after_id` out of bounds", body = ErrorBody),
        (status = 503, description = "Database unavailable", body = ErrorBody),
    )
)]
pub async fn list_products(
    State(state): State<AppState>,
    Query(filter): Query<ListFilter>,
    RawQuery(query): RawQuery,
) -> AppResult<Response> {
    let page = Page::new(filter.limit, filter.after_id)?;
    let category = filter.category.as_deref().map(str::trim);
    let products = state.db.read(|conn| {
        conn.prepare_cached(concat!(
            "SELECT ",
            product_columns!(),
            " FROM products
             WHERE (?1 IS NULL OR category = ?1 COLLATE NOCASE) AND id > ?2
             ORDER BY id LIMIT ?3"
        ))?
        .query_map((category, page.after_id, page.fetch()), Product::from_row)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(AppError::from)
    })?;
    Ok(page.answer(products, |product| product.id, query.as_deref()))
}

/// One product.
#[utoipa::path(
    get,
    path = "/products/{id}",
    tag = "products",
    params(("id" = i64, Path, description = "The product's id")),
    responses(
        (status = 200, description = "The product", body = Product),
        (status = 404, description = "No such product", body = ErrorBody),
        (status = 422, description = "The id is not an integer", body = ErrorBody),
        (status = 503, description = "Database unavailable", body = ErrorBody),
    )
)]
pub async fn get_product(
    State(state): State<AppState>,
    Path(id): Path<i64>,
) -> AppResult<Json<Product>> {
    let product = state.db.read(|conn| {
        conn.prepare_cached(concat!(
            "SELECT ",
            product_columns!(),
            " FROM products WHERE id = ?"
        ))?
        .query_row([id], Product::from_row)
        .optional()
        .map_err(AppError::from)
    })?;
    Ok(Json(
        product.ok_or_else(|| AppError::not_found("Product not found"))?,
    ))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct StockChange {
    /// Added to the stock; negative to take some away.
    #[param(minimum = -1_000_000_000, maximum = 1_000_000_000)]
    pub stock_change: i64,
}

#[derive(Debug, Serialize, Deserialize, PartialEq, Eq, ToSchema)]
pub struct StockChanged {
    pub product_id: i64,
    pub new_stock: i64,
}

/// `PUT /products/{id}/stock?stock_change=N`: adds N (may be negative) in one
/// conditional statement, so concurrent changes never lose an update and
/// stock never goes below zero.
#[utoipa::path(
    put,
    path = "/products/{id}/stock",
    tag = "products",
    params(("id" = i64, Path, description = "The product's id"), StockChange),
    responses(
        (status = 200, description = "The new stock", body = StockChanged),
        (status = 400, description = "Insufficient stock", body = ErrorBody),
        (status = 404, description = "No such product", body = ErrorBody),
        (status = 422, description = "`stock_change` missing or out of bounds, or the stock would exceed 1000000000", body = ErrorBody),
        (status = 503, description = "Database unavailable", body = ErrorBody),
    )
)]
pub async fn change_stock(
    State(state): State<AppState>,
    Path(id): Path<i64>,
    Query(StockChange { stock_change }): Query<StockChange>,
) -> AppResult<Json<StockChanged>> {
    if stock_change.abs() > MAX_STOCK {
        return Err(AppError::unprocessable(format!(
            "stock_change must be between -{MAX_STOCK} and {MAX_STOCK}"
        )));
    }
    let updated: Option<i64> = state
        .db
        .write(move |conn| {
            conn.prepare_cached(
                "UPDATE products SET stock = stock + ?1
                 WHERE id = ?2 AND stock + ?1 BETWEEN 0 AND ?3
                 RETURNING stock",
            )?
            .query_row((stock_change, id, MAX_STOCK), |row| row.get(0))
            .optional()
            .map_err(AppError::from)
        })
        .await?;
    if let Some(new_stock) = updated {
        return Ok(Json(StockChanged {
            product_id: id,
            new_stock,
        }));
    }
    // Nothing changed: say why. The stock read here only picks the message;
    // it decides nothing.
    let stock: Option<i64> = state.db.read(|conn| {
        conn.prepare_cached("SELECT stock FROM products WHERE id = ?")?
            .query_row([id], |row| row.get(0))
            .optional()
            .map_err(AppError::from)
    })?;
    match stock {
        None => Err(AppError::not_found("Product not found")),
        Some(_) if stock_change < 0 => Err(AppError::bad_request("Insufficient stock")),
        Some(_) => Err(AppError::unprocessable(format!(
            "stock would exceed {MAX_STOCK}"
        ))),
    }
}
