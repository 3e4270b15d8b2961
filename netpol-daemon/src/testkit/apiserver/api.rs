//! The API's endpoints: `/version`, discovery (`/api`, `/apis`, `/api/v1`, `/apis/G/V`), and
//! per resource `GET` (list, watch, get), `POST` (create), `PATCH` (JSON merge patch, strategic
//! merge patch read as a merge patch, server-side apply read as create-or-merge), `PUT` and
//! `DELETE`, on `/api/v1/[namespaces/NS/]PLURAL[/NAME]` and `/apis/G/V/[namespaces/NS/]PLURAL[/NAME]`.
//!
//! Lists page over a consistent snapshot: `limit` cuts a page, its `continue` token holds the
//! snapshot's resourceVersion and the last key, and continuing a compacted snapshot is
//! 410 Gone. `resourceVersion`/`resourceVersionMatch` follow the API's table: unset = most
//! recent; "0" = any (served whole, `limit` ignored, as from the watch cache); R with
//! NotOlderThan (or without a match and without a limit) = the latest state, 504 if R is in
//! the future; R with Exact (or without a match but with a limit) = the state at R, 410 if R
//! is compacted.
use std::io::{self, Write};

use serde_json::{json, Value};

use super::http::{self, Request};
use super::select::Filter;
use super::store::{object_key, ApiError, Page, Resource, Store, RESOURCES};
use super::{watch, Answer, Shared};

/// What a request path names.
enum Target {
    Version,
    Discovery(Value),
    Collection { res: &'static Resource, namespace: Option<String> },
    Object { res: &'static Resource, namespace: Option<String>, name: String },
}

enum Reply {
    Json(u16, Vec<u8>),
    Watch(&'static Resource, Filter, watch::Params),
}

/// Answers one request on `out`.
pub fn handle(shared: &Shared, req: &Request, out: &mut impl Write, logged: &mut dyn FnMut(u16, bool)) -> io::Result<Answer> {
    match answer(shared, req) {
        Ok(Reply::Json(code, body)) => {
            logged(code, false);
            http::respond(out, code, &body)?;
            Ok(Answer { keep_alive: true })
        }
        Ok(Reply::Watch(res, filter, params)) => watch::stream(shared, res, &filter, &params, out, logged),
        Err(e) => {
            logged(e.code, e.code == 410);
            http::respond(out, e.code, e.status().to_string().as_bytes())?;
            Ok(Answer { keep_alive: true })
        }
    }
}

/// What the real server answers on a path it does not serve (a CRD's, before it is
/// installed): not a `Status`, plain text.
const PAGE_NOT_FOUND: &[u8] = b"404 page not found\n";

fn answer(shared: &Shared, req: &Request) -> Result<Reply, ApiError> {
    let target = {
        let store = shared.store.lock().unwrap();
        parse_target(&req.path, &|r| store.served(r))
    };
    let Some(target) = target else { return Ok(Reply::Json(404, PAGE_NOT_FOUND.to_vec())) };
    let json = |code, v: &Value| Ok(Reply::Json(code, serde_json::to_vec(v).expect("a JSON value serializes")));
    match (req.method.as_str(), target) {
        ("GET", Target::Version) => json(200, &version()),
        ("GET", Target::Discovery(v)) => json(200, &v),
        ("GET", Target::Collection { res, namespace }) => {
            let filter = Filter::new(namespace.as_deref(), req.param("fieldSelector"), req.param("labelSelector"))?;
            if req.flag("watch") {
                return Ok(Reply::Watch(res, filter, watch::params(req)?));
            }
            Ok(Reply::Json(200, list(&shared.store.lock().unwrap(), res, &filter, req)?))
        }
        ("POST", Target::Collection { res, namespace }) => json(201, &create(shared, res, namespace.as_deref(), req)?),
        ("GET", Target::Object { res, namespace, name }) => {
            let key = res.key(namespace.as_deref().unwrap_or(""), &name);
            let obj = shared.store.lock().unwrap().get(res, &key).ok_or_else(|| ApiError::not_found(res, &name))?;
            json(200, &obj)
        }
        ("PATCH" | "PUT", Target::Object { res, namespace, name }) => {
            let (code, obj) = update(shared, res, namespace.as_deref().unwrap_or(""), &name, req)?;
            json(code, &obj)
        }
        ("DELETE", Target::Object { res, namespace, name }) => {
            let key = res.key(namespace.as_deref().unwrap_or(""), &name);
            let last = shared.modify(|s| s.delete(res, &key)).ok_or_else(|| ApiError::not_found(res, &name))?;
            json(200, &last)
        }
        (m, _) => Err(ApiError::new(405, "MethodNotAllowed", format!("{m} is not supported here"))),
    }
}

/// What `path` names among the resources `served` (built in, or of a CRD installed).
fn parse_target(path: &str, served: &dyn Fn(&Resource) -> bool) -> Option<Target> {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, version, rest) = match segs.as_slice() {
        ["version"] => return Some(Target::Version),
        ["api"] => return Some(Target::Discovery(json!({"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []}))),
        ["apis"] => return Some(Target::Discovery(api_groups(served))),
        ["api", v] => return api_resources("", v, served).map(Target::Discovery),
        ["apis", g, v] => return api_resources(g, v, served).map(Target::Discovery),
        ["api", v, rest @ ..] => ("", *v, rest),
        ["apis", g, v, rest @ ..] => (*g, *v, rest),
        _ => return None,
    };
    let (namespace, tail) = match rest {
        ["namespaces", ns, tail @ ..] if !tail.is_empty() => (Some(ns.to_string()), tail),
        _ => (None, rest),
    };
    let (plural, name) = match tail {
        [p] => (*p, None),
        [p, n] => (*p, Some(n.to_string())),
        _ => return None,
    };
    let res = Resource::named(plural)
        .filter(|r| r.group == group && r.version == version && (r.namespaced || namespace.is_none()) && served(r))?;
    Some(match name {
        None => Target::Collection { res, namespace },
        Some(name) => Target::Object { res, namespace, name },
    })
}

fn version() -> Value {
    json!({"major": "1", "minor": "31", "gitVersion": "v1.31.0", "gitCommit": "stand-in", "gitTreeState": "clean",
           "buildDate": "2024-01-01T00:00:00Z", "goVersion": "go1.22", "compiler": "gc", "platform": "linux/amd64"})
}

fn api_groups(served: &dyn Fn(&Resource) -> bool) -> Value {
    let mut groups: Vec<Value> = Vec::new();
    for r in RESOURCES.iter().filter(|r| !r.group.is_empty() && served(r)) {
        if !groups.iter().any(|g| g["name"] == r.group) {
            let gv = json!({"groupVersion": r.api_version(), "version": r.version});
            groups.push(json!({"name": r.group, "versions": [gv], "preferredVersion": gv}));
        }
    }
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

fn api_resources(group: &str, version: &str, served: &dyn Fn(&Resource) -> bool) -> Option<Value> {
    let verbs = ["create", "delete", "get", "list", "patch", "update", "watch"];
    let resources: Vec<Value> = RESOURCES
        .iter()
        .filter(|r| r.group == group && r.version == version && served(r))
        .map(|r| {
            json!({"name": r.plural, "singularName": r.kind.to_lowercase(), "namespaced": r.namespaced, "kind": r.kind, "verbs": verbs})
        })
        .collect();
    let gv = if group.is_empty() { version.to_string() } else { format!("{group}/{version}") };
    (!resources.is_empty()).then(|| json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": resources}))
}

/// Where a list is read: at which resourceVersion (None: the latest), after which key, and
/// whether `limit` applies.
struct ListFrom {
    at: Option<u64>,
    after: Option<String>,
    paged: bool,
}

const CONTINUE_EXPIRED: &str = "The provided continue parameter is too old to display a consistent list result. \
                                You can start a new list without the continue parameter.";

fn list_from(store: &Store, req: &Request, limited: bool) -> Result<ListFrom, ApiError> {
    let rv = req.param("resourceVersion").unwrap_or("");
    let matching = req.param("resourceVersionMatch").unwrap_or("");
    if let Some(token) = req.param("continue").filter(|t| !t.is_empty()) {
        if !rv.is_empty() {
            return Err(ApiError::bad_request("specifying resource version is not allowed when using continue"));
        }
        let (at, after) = token
            .split_once('/')
            .and_then(|(rv, key)| Some((rv.parse::<u64>().ok()?, key)))
            .ok_or_else(|| ApiError::bad_request("continue key is not valid"))?;
        if at < store.compacted() {
            return Err(ApiError::expired(CONTINUE_EXPIRED));
        }
        return Ok(ListFrom { at: Some(at), after: Some(after.to_string()), paged: true });
    }
    let latest = |paged| Ok(ListFrom { at: None, after: None, paged });
    match (rv, matching) {
        ("", "") => latest(true),
        ("", _) => Err(ApiError::bad_request("resourceVersionMatch is forbidden unless resourceVersion is provided")),
        ("0", "Exact") => Err(ApiError::bad_request("resourceVersionMatch \"Exact\" is forbidden for resourceVersion \"0\"")),
        ("0", "" | "NotOlderThan") => latest(false),
        (_, "" | "NotOlderThan" | "Exact") => {
            let at: u64 = rv.parse().map_err(|_| ApiError::bad_request(format!("invalid resource version {rv:?}")))?;
            if at > store.rv() {
                return Err(ApiError::new(504, "Timeout", format!("Too large resource version: {at}, current: {}", store.rv())));
            }
            if !(matching == "Exact" || (matching.is_empty() && limited)) {
                return latest(true);
            }
            if at < store.compacted() {
                return Err(ApiError::too_old(at, store.compacted()));
            }
            Ok(ListFrom { at: Some(at), after: None, paged: true })
        }
        (_, m) => Err(ApiError::bad_request(format!("unsupported resourceVersionMatch {m:?}"))),
    }
}

/// The body of a list response.
fn list(store: &Store, res: &Resource, filter: &Filter, req: &Request) -> Result<Vec<u8>, ApiError> {
    let limit = match req.param("limit").unwrap_or("") {
        "" => None,
        l => Some(l.parse::<usize>().map_err(|_| ApiError::bad_request(format!("invalid limit {l:?}")))?).filter(|&l| l > 0),
    };
    let from = list_from(store, req, limit.is_some())?;
    let limit = limit.filter(|_| from.paged);
    let page = store.page(res, from.at, from.after.as_deref(), limit, &|o| filter.matches(o)).expect("list_from checked the compaction");
    Ok(list_body(res, &page))
}

fn list_body(res: &Resource, page: &Page) -> Vec<u8> {
    let mut meta = json!({"resourceVersion": page.rv.to_string()});
    if let Some(key) = &page.last_key {
        meta["continue"] = format!("{}/{key}", page.rv).into();
    }
    let mut body = format!(r#"{{"kind":"{}List","apiVersion":"{}","metadata":{meta},"items":["#, res.kind, res.api_version()).into_bytes();
    for (i, obj) in page.items.iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        serde_json::to_writer(&mut body, &**obj).expect("a JSON value serializes");
    }
    body.extend_from_slice(b"]}");
    body
}

/// A request body: JSON, or YAML (server-side apply patches may be either).
fn body_value(req: &Request) -> Result<Value, ApiError> {
    serde_json::from_slice(&req.body)
        .or_else(|_| serde_norway::from_slice(&req.body))
        .map_err(|e| ApiError::bad_request(format!("the request body is not JSON or YAML: {e}")))
}

/// Puts the path's namespace into `obj`, refusing a different one.
fn place(obj: &mut Value, namespace: Option<&str>) -> Result<(), ApiError> {
    let Some(ns) = namespace else { return Ok(()) };
    match obj["metadata"]["namespace"].as_str() {
        Some(given) if !given.is_empty() && given != ns => {
            Err(ApiError::bad_request("the namespace of the provided object does not match the namespace sent on the request"))
        }
        _ => {
            obj["metadata"]["namespace"] = ns.into();
            Ok(())
        }
    }
}

fn create(shared: &Shared, res: &'static Resource, namespace: Option<&str>, req: &Request) -> Result<Value, ApiError> {
    let mut obj = body_value(req)?;
    place(&mut obj, namespace)?;
    shared.modify(|store| {
        if obj["metadata"]["name"].as_str().unwrap_or("").is_empty() {
            if let Some(prefix) = obj["metadata"]["generateName"].as_str() {
                obj["metadata"]["name"] = format!("{prefix}{:05x}", store.rv() + 1).into();
            }
        }
        let key = object_key(res, &obj)?;
        if store.get(res, &key).is_some() {
            let name = &obj["metadata"]["name"];
            return Err(ApiError::new(409, "AlreadyExists", format!("{}.{} {name} already exists", res.plural, res.group)));
        }
        Ok((*store.put(res, obj)?).clone())
    })
}

/// PATCH (merge) or PUT (replace) the object `namespace/name`; an apply patch creates it.
fn update(shared: &Shared, res: &'static Resource, namespace: &str, name: &str, req: &Request) -> Result<(u16, Value), ApiError> {
    if req.method == "PATCH" && req.content_type.starts_with("application/json-patch") {
        return Err(ApiError::new(415, "UnsupportedMediaType", "JSON patches are not supported by the stand-in API server"));
    }
    let body = body_value(req)?;
    let apply = req.content_type.starts_with("application/apply-patch");
    shared.modify(|store| {
        let current = store.get(res, &res.key(namespace, name));
        let mut obj = match (&current, apply) {
            (Some(c), _) => (**c).clone(),
            (None, true) => json!({}),
            (None, false) => return Err(ApiError::not_found(res, name)),
        };
        let want = body["metadata"]["resourceVersion"].as_str().filter(|v| !v.is_empty());
        if want.is_some_and(|v| Some(v) != obj["metadata"]["resourceVersion"].as_str()) {
            let msg = "the object has been modified; please apply your changes to the latest version and try again";
            let what = format!("{}.{} \"{name}\"", res.plural, res.group);
            return Err(ApiError::new(409, "Conflict", format!("Operation cannot be fulfilled on {what}: {msg}")));
        }
        if req.method == "PUT" {
            obj = body
        } else {
            merge_patch(&mut obj, &body)
        }
        obj["metadata"]["name"] = name.into();
        if res.namespaced {
            obj["metadata"]["namespace"] = namespace.into();
        }
        let stored = (*store.put(res, obj)?).clone();
        Ok((if current.is_some() { 200 } else { 201 }, stored))
    })
}

/// RFC 7386 JSON merge patch.
fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(fields) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = json!({});
    }
    let t = target.as_object_mut().expect("made an object above");
    for (k, v) in fields {
        if v.is_null() {
            t.remove(k);
        } else {
            merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_name_what_the_api_serves() {
        let all = |_: &Resource| true;
        let parse_target = |path: &str| parse_target(path, &all);
        let t = parse_target("/api/v1/namespaces/shop/pods/web-1");
        assert!(
            matches!(t, Some(Target::Object { res, namespace: Some(ns), name }) if res.plural == "pods" && ns == "shop" && name == "web-1")
        );
        assert!(
            matches!(parse_target("/api/v1/namespaces/shop"), Some(Target::Object { res, namespace: None, .. }) if res.plural == "namespaces")
        );
        assert!(matches!(parse_target("/apis/networking.k8s.io/v1/networkpolicies"), Some(Target::Collection { namespace: None, .. })));
        assert!(parse_target("/apis/networking.k8s.io/v2/networkpolicies").is_none());
        assert!(parse_target("/api/v1/namespaces/a/namespaces").is_none(), "namespaces are cluster-scoped");
        assert!(matches!(parse_target("/apis"), Some(Target::Discovery(v)) if v["groups"].as_array().unwrap().len() == 4));
        // A CRD's resource is served only while the CRD is installed.
        let cnps = "/apis/policy.networking.k8s.io/v1alpha2/clusternetworkpolicies";
        assert!(matches!(parse_target(cnps), Some(Target::Collection { namespace: None, .. })));
        let builtin = |r: &Resource| !r.crd;
        assert!(super::parse_target(cnps, &builtin).is_none());
        assert!(super::parse_target("/apis/policy.networking.k8s.io/v1alpha2", &builtin).is_none());
        assert!(matches!(super::parse_target("/apis", &builtin), Some(Target::Discovery(v)) if v["groups"].as_array().unwrap().len() == 3));
        assert!(matches!(parse_target("/api/v1/nodes/n1"), Some(Target::Object { res, namespace: None, .. }) if res.kind == "Node"));
    }

    #[test]
    fn merge_patches_replace_and_remove() {
        let mut obj = json!({"a": {"b": 1, "c": 2}, "d": [1]});
        merge_patch(&mut obj, &json!({"a": {"b": null, "e": 3}, "d": [2]}));
        assert_eq!(obj, json!({"a": {"c": 2, "e": 3}, "d": [2]}));
    }
}
