//! The rules that turn a microserver's declared routes into a route table, shared by the
//! host's router and [`testing`](crate::testing), so that a plugin's tests route exactly
//! as the host does. Not part of the API plugin authors use.

/// One path pattern's routes.
#[derive(Debug)]
pub struct PathRoutes {
    pub pattern: String,
    /// (method, route index) in declaration order.
    pub methods: Vec<(String, u32)>,
    /// The route for any method (`*`), if one was declared.
    pub any: Option<u32>,
    /// The methods the path answers, for an `Allow` header (`HEAD` added with `GET`).
    pub allow: String,
}

impl PathRoutes {
    /// The route for `method`: the exact method, then `GET` for `HEAD`, then `*`.
    #[inline]
    pub fn route_for(&self, method: &str) -> Option<u32> {
        let by_method = |wanted: &str| {
            self.methods
                .iter()
                .find(|(m, _)| m == wanted)
                .map(|&(_, route)| route)
        };
        by_method(method)
            .or_else(|| {
                if method == "HEAD" {
                    by_method("GET")
                } else {
                    None
                }
            })
            .or(self.any)
    }
}

/// Routes grouped by path pattern, and the paths in a matchit router (the value is the
/// index into `paths`).
#[derive(Debug)]
pub struct Grouped {
    pub router: matchit::Router<usize>,
    pub paths: Vec<PathRoutes>,
}

/// Groups `routes` ((method, pattern) in route-index order), refusing what the host
/// refuses: a pattern that does not start with `/` or that the router cannot take, a
/// method that is not one, a route declared twice.
pub fn group<'a>(routes: impl IntoIterator<Item = (&'a str, &'a str)>) -> Result<Grouped, String> {
    let mut router = matchit::Router::new();
    let mut paths: Vec<PathRoutes> = Vec::new();
    let mut by_pattern: std::collections::HashMap<&str, usize> = Default::default();
    for (index, (method, pattern)) in routes.into_iter().enumerate() {
        let index = index as u32;
        let slot = match by_pattern.get(pattern) {
            Some(&slot) => slot,
            None => {
                if !pattern.starts_with('/') {
                    return Err(format!("route pattern {pattern:?} must start with `/`"));
                }
                router
                    .insert(pattern, paths.len())
                    .map_err(|e| format!("route pattern {pattern:?}: {e}"))?;
                by_pattern.insert(pattern, paths.len());
                paths.push(PathRoutes {
                    pattern: pattern.to_owned(),
                    methods: Vec::new(),
                    any: None,
                    allow: String::new(),
                });
                paths.len() - 1
            }
        };
        let path = &mut paths[slot];
        let valid =
            !method.is_empty() && method.bytes().all(|b| b.is_ascii_uppercase() || b == b'-');
        if method == "*" {
            path.any.get_or_insert(index);
        } else if !valid {
            return Err(format!(
                "route {method} {pattern}: {method:?} is not an HTTP method"
            ));
        } else if path.methods.iter().any(|(m, _)| m == method) {
            return Err(format!("route {method} {pattern} is declared twice"));
        } else {
            path.methods.push((method.to_owned(), index));
        }
    }
    for path in &mut paths {
        let mut allow: Vec<&str> = path.methods.iter().map(|(m, _)| m.as_str()).collect();
        if allow.contains(&"GET") && !allow.contains(&"HEAD") {
            allow.push("HEAD");
        }
        path.allow = allow.join(", ");
    }
    Ok(Grouped { router, paths })
}
