//! A microserver's route table, built once per generation from what its init returned.

use hyper::http::HeaderValue;
use plugin_api::route_table;

use crate::boundary::bulkhead::{self, Label};

/// Path patterns and the methods each answers, compiled into a radix tree.
#[derive(Debug)]
pub struct RouteTable {
    router: matchit::Router<usize>,
    paths: Vec<PathRoutes>,
    fallback: Option<u32>,
    /// Each route as `METHOD /pattern`, by index, for log lines.
    described: Vec<String>,
    /// By route index: `Some(limit)` for a route that takes its body as a stream;
    /// empty when no route does.
    stream_body_limits: Box<[Option<u64>]>,
    /// By route index: whether it is a WebSocket route; empty when none is.
    websockets: Box<[bool]>,
    /// The bus topics the generation subscribes to, by subscription index (declared
    /// with the routes).
    topics: Box<[Box<str>]>,
    /// Each route's label for the blocking watchdog, by index, then the fallback's
    /// (empty until [`RouteTable::labelled`]).
    labels: Box<[Label]>,
}

#[derive(Debug)]
struct PathRoutes {
    /// The path's routes by method.
    routes: route_table::PathRoutes,
    allow: HeaderValue,
    /// The pattern's parameter names in order, `'static` so that a request can carry
    /// them (see `call::intern`).
    params: Box<[&'static str]>,
}

/// The outcome of matching a request.
#[derive(Debug)]
pub enum RouteMatch<'t, 'p> {
    Found {
        route: u32,
        params: matchit::Params<'t, 'p>,
        /// The parameters' names in the order of `params`, when known in advance.
        names: &'t [&'static str],
    },
    /// The path exists with other methods; the value is the `Allow` header.
    MethodNotAllowed(&'t HeaderValue),
    NotFound,
}

impl RouteTable {
    /// Builds the table. `routes` are (method, pattern) in route-index order; they are
    /// grouped and checked by `plugin_api::route_table`, the rules `plugin_api::testing`
    /// routes by too.
    pub fn new<'a>(
        routes: impl IntoIterator<Item = (&'a str, &'a str)>,
        fallback: Option<u32>,
    ) -> Result<Self, String> {
        let routes: Vec<(&str, &str)> = routes.into_iter().collect();
        let described = routes.iter().map(|(m, p)| format!("{m} {p}")).collect();
        let grouped = route_table::group(routes)?;
        let paths = grouped
            .paths
            .into_iter()
            .map(|routes| {
                Ok(PathRoutes {
                    allow: HeaderValue::from_str(&routes.allow).map_err(|e| e.to_string())?,
                    params: param_names(&routes.pattern)
                        .map(crate::boundary::call::intern)
                        .collect(),
                    routes,
                })
            })
            .collect::<Result<_, String>>()?;
        Ok(RouteTable {
            router: grouped.router,
            paths,
            fallback,
            described,
            stream_body_limits: Box::default(),
            websockets: Box::default(),
            topics: Box::default(),
            labels: Box::default(),
        })
    }

    /// Names each route, with its server's name, for the blocking watchdog.
    pub fn labelled(mut self, server: &std::sync::Arc<str>) -> Self {
        self.labels = self
            .described
            .iter()
            .map(String::as_str)
            .chain(["fallback"])
            .map(|route| bulkhead::label(server, route))
            .collect();
        self
    }

    /// `route`'s label for the blocking watchdog (the fallback's past the declared
    /// routes).
    #[inline]
    pub fn label(&self, route: u32) -> Label {
        let labels = &self.labels;
        match labels.get(route as usize).or(labels.last()) {
            Some(label) => *label,
            None => Label::UNNAMED,
        }
    }

    /// The bus topics the generation subscribes to.
    pub fn with_topics(mut self, topics: Vec<Box<str>>) -> Self {
        self.topics = topics.into();
        self
    }

    /// The bus topics, by subscription index.
    pub fn topics(&self) -> &[Box<str>] {
        &self.topics
    }

    /// The subscription index of `topic`, if the generation subscribes to it.
    pub fn topic_index(&self, topic: &[u8]) -> Option<u32> {
        self.topics
            .iter()
            .position(|t| t.as_bytes() == topic)
            .map(|i| i as u32)
    }

    /// Marks WebSocket routes, by index.
    pub fn with_websockets(mut self, websockets: Vec<bool>) -> Self {
        if websockets.iter().any(|w| *w) {
            self.websockets = websockets.into();
        }
        self
    }

    /// Whether `route` is a WebSocket route.
    pub fn is_websocket(&self, route: u32) -> bool {
        self.websockets
            .get(route as usize)
            .copied()
            .unwrap_or(false)
    }

    /// Whether any route is a WebSocket route (a generation without one cannot take
    /// over open connections).
    pub fn takes_websockets(&self) -> bool {
        !self.websockets.is_empty()
    }

    /// Marks routes that take their body as a stream, by index, with their limits.
    pub fn with_stream_body_limits(mut self, limits: Vec<Option<u64>>) -> Self {
        if limits.iter().any(Option::is_some) {
            self.stream_body_limits = limits.into();
        }
        self
    }

    /// `Some(limit)` if `route` takes its body as a stream of at most `limit` bytes.
    #[inline]
    pub fn stream_body_limit(&self, route: u32) -> Option<u64> {
        self.stream_body_limits
            .get(route as usize)
            .copied()
            .flatten()
    }

    /// A route by index, as `METHOD /pattern` (or `fallback`), for log lines.
    pub fn describe(&self, route: u32) -> &str {
        self.described
            .get(route as usize)
            .map_or("fallback", String::as_str)
    }

    /// Matches a request. `HEAD` falls back to the `GET` route. (Inlined: it is on the
    /// request path, and called from two places.)
    #[inline(always)]
    pub fn find<'t, 'p>(&'t self, method: &str, path: &'p str) -> RouteMatch<'t, 'p> {
        let Ok(m) = self.router.at(path) else {
            return match self.fallback {
                Some(route) => RouteMatch::Found {
                    route,
                    params: matchit::Params::new(),
                    names: &[],
                },
                None => RouteMatch::NotFound,
            };
        };
        let entry = &self.paths[*m.value];
        let route = entry.routes.route_for(method);
        match route {
            Some(route) => RouteMatch::Found {
                route,
                params: m.params,
                names: &entry.params,
            },
            None => RouteMatch::MethodNotAllowed(&entry.allow),
        }
    }
}

/// The parameter names of a matchit pattern in order: `{name}` and `{*name}` segments
/// (`{{` and `}}` are escaped braces).
fn param_names(pattern: &str) -> impl Iterator<Item = &str> {
    let mut rest = pattern;
    std::iter::from_fn(move || loop {
        let open = rest.find('{')?;
        if rest[open + 1..].starts_with('{') {
            rest = &rest[open + 2..];
            continue;
        }
        let close = open + rest[open..].find('}')?;
        let name = &rest[open + 1..close];
        rest = &rest[close + 1..];
        return Some(name.strip_prefix('*').unwrap_or(name));
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> RouteTable {
        RouteTable::new(
            [
                ("GET", "/"),
                ("GET", "/users/{id}"),
                ("DELETE", "/users/{id}"),
                ("*", "/files/{*path}"),
            ],
            None,
        )
        .unwrap()
    }

    #[test]
    fn matches_methods_params_and_catch_all() {
        let t = table();
        let RouteMatch::Found {
            route,
            params,
            names,
        } = t.find("DELETE", "/users/42")
        else {
            panic!()
        };
        assert_eq!(
            (route, params.get("id"), names),
            (2, Some("42"), &["id"][..])
        );
        let RouteMatch::Found {
            route,
            params,
            names,
        } = t.find("PUT", "/files/a/b.txt")
        else {
            panic!()
        };
        assert_eq!(
            (route, params.get("path"), names),
            (3, Some("a/b.txt"), &["path"][..])
        );
        assert!(matches!(
            t.find("HEAD", "/"),
            RouteMatch::Found { route: 0, .. }
        ));
        assert!(matches!(t.find("GET", "/nope"), RouteMatch::NotFound));
        let RouteMatch::MethodNotAllowed(allow) = t.find("POST", "/users/1") else {
            panic!()
        };
        assert_eq!(allow, "GET, DELETE, HEAD");
    }

    #[test]
    fn parameter_names_come_in_pattern_order() {
        let names: Vec<&str> = param_names("/a/{first}/{{x}}/{last}/{*rest}").collect();
        assert_eq!(names, ["first", "last", "rest"]);
        assert_eq!(param_names("/plain").count(), 0);
        let t = RouteTable::new([("GET", "/greet/{first}/{last}")], None).unwrap();
        let RouteMatch::Found { params, names, .. } = t.find("GET", "/greet/ada/lovelace") else {
            panic!()
        };
        let keys: Vec<&str> = params.iter().map(|(k, _)| k).collect();
        assert_eq!(keys, names);
    }

    #[test]
    fn fallback_answers_unknown_paths() {
        let t = RouteTable::new([("GET", "/")], Some(1)).unwrap();
        assert!(matches!(
            t.find("GET", "/x/y"),
            RouteMatch::Found { route: 1, .. }
        ));
    }

    #[test]
    fn bad_tables_are_refused_with_the_pattern() {
        let err = RouteTable::new([("GET", "/{a}"), ("GET", "/{b}")], None).unwrap_err();
        assert!(err.contains("/{b}"), "{err}");
        let err = RouteTable::new([("GET", "/x"), ("GET", "/x")], None).unwrap_err();
        assert!(err.contains("declared twice"), "{err}");
        assert!(RouteTable::new([("GET", "x")], None).is_err());
    }
}
