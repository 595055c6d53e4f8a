//! Paginated lists: `limit` (default [`DEFAULT_LIMIT`], at most
//! [`MAX_LIMIT`]) and `after_id` (the last id of the previous page), in id
//! order. The answer stays a JSON array, as the original's clients expect,
//! with `Link: <?...after_id=N>; rel="next"` when another page may follow:
//! a query-only reference, so it resolves against whatever URL the client
//! used (through the gateway's prefix or not).

use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::extract::Json;
use crate::{AppError, AppResult};

pub const DEFAULT_LIMIT: i64 = 100;
pub const MAX_LIMIT: i64 = 1000;

/// One page's bounds, checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Page {
    pub limit: i64,
    /// Only ids above this one (0: from the start).
    pub after_id: i64,
}

impl Page {
    /// `limit` and `after_id` as the query gave them; out of range is a 422.
    pub fn new(limit: Option<i64>, after_id: Option<i64>) -> AppResult<Page> {
        let limit = limit.unwrap_or(DEFAULT_LIMIT);
        if !(1..=MAX_LIMIT).contains(&limit) {
            return Err(AppError::unprocessable(format!(
                "limit must be between 1 and {MAX_LIMIT}"
            )));
        }
        let after_id = after_id.unwrap_or(0);
        if after_id < 0 {
            return Err(AppError::unprocessable("after_id must not be negative"));
        }
        Ok(Page { limit, after_id })
    }

    /// How many rows to ask the database for: one more than the page, to
    /// know whether another follows.
    pub fn fetch(&self) -> i64 {
        self.limit + 1
    }

    /// Cuts `items` (in id order, at most [`Self::fetch`] of them) to the
    /// page and answers them, with the `Link` to the next page if the
    /// database had more. `query` is the request's raw query: its other
    /// parameters (filters) are kept in the link.
    pub fn answer<T: Serialize>(
        &self,
        mut items: Vec<T>,
        id: impl Fn(&T) -> i64,
        query: Option<&str>,
    ) -> Response {
        let more = items.len() as i64 > self.limit;
        items.truncate(usize::try_from(self.limit).unwrap_or(usize::MAX));
        let next = more.then(|| items.last().map(&id)).flatten();
        let mut response = Json(items).into_response();
        if let Some(last) = next
            && let Ok(value) = HeaderValue::from_str(&self.next_link(last, query))
        {
            response.headers_mut().insert(header::LINK, value);
        }
        response
    }

    fn next_link(&self, last: i64, query: Option<&str>) -> String {
        let mut next = form_urlencoded::Serializer::new(String::new());
        for (key, value) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
            if key != "limit" && key != "after_id" {
                next.append_pair(&key, &value);
            }
        }
        next.append_pair("limit", &self.limit.to_string());
        next.append_pair("after_id", &last.to_string());
        format!("<?{}>; rel=\"next\"", next.finish())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_are_checked() {
        assert_eq!(
            Page::new(None, None).unwrap(),
            Page {
                limit: 100,
                after_id: 0
            }
        );
        assert!(Page::new(Some(1000), Some(5)).is_ok());
        for (limit, after) in [(Some(0), None), (Some(1001), None), (None, Some(-1))] {
            let err = Page::new(limit, after).unwrap_err();
            assert_eq!(err.status(), 422);
        }
    }

    #[test]
    fn the_next_link_keeps_the_filters() {
        let page = Page::new(Some(2), Some(4)).unwrap();
        let response = page.answer(
            vec![5, 6, 7],
            |i| *i,
            Some("category=a%20b&limit=2&after_id=4"),
        );
        assert_eq!(
            response.headers()["link"],
            "<?category=a+b&limit=2&after_id=6>; rel=\"next\""
        );
        let response = page.answer(vec![5, 6], |i| *i, None);
        assert!(response.headers().get("link").is_none(), "no more rows");
    }
}
