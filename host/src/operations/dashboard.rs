//! The dashboard: one page on the admin listener showing every server and its traffic,
//! with buttons that call the admin API. Its HTML, CSS and JS are in `dashboard/`,
//! built into the binary; the page polls `/api/servers`, `/api/stats` and
//! `/api/reloads` every second and works out rates from the differences.

use hyper::StatusCode;

use super::admin::{reply, Reply};

const PAGE: &str = include_str!("dashboard/index.html");
const STYLE: &str = include_str!("dashboard/dashboard.css");
const SCRIPT: &str = include_str!("dashboard/dashboard.js");

/// The page's files, by path; `None` for any other path. They hold no data (that comes
/// from the API, with the token), so they are served without the token.
pub fn asset(path: &str) -> Option<Reply> {
    let (content_type, body) = match path {
        "/" => ("text/html; charset=utf-8", PAGE),
        "/dashboard.css" => ("text/css; charset=utf-8", STYLE),
        "/dashboard.js" => ("text/javascript; charset=utf-8", SCRIPT),
        _ => return None,
    };
    Some(reply(StatusCode::OK, content_type, body.to_owned()))
}
