//! Which objects a list or watch request selects: its namespace (from the path), its
//! `fieldSelector` (`status.phase!=Succeeded,status.phase!=Failed`: `=`, `==`, `!=` on a
//! dotted field path, compared as text, a missing field being "") and its `labelSelector`
//! (`k=v`, `k==v`, `k!=v`, `k`, `!k`, `k in (a,b)`, `k notin (a,b)`), as the API server
//! evaluates them. A watch uses the same filter on the objects before and after each change,
//! which is how an object leaving the selection becomes a DELETED event.
use serde_json::Value;

use super::store::ApiError;

#[derive(Debug)]
enum Op {
    Eq,
    Ne,
    In,
    NotIn,
    Exists,
    NotExists,
}

#[derive(Debug)]
struct Term {
    key: String,
    op: Op,
    values: Vec<String>,
}

impl Term {
    /// Whether `value` (None: the field or label is absent) satisfies the term.
    fn accepts(&self, value: Option<&str>) -> bool {
        match self.op {
            Op::Eq | Op::In => value.is_some_and(|v| self.values.iter().any(|w| w == v)),
            Op::Ne | Op::NotIn => !value.is_some_and(|v| self.values.iter().any(|w| w == v)),
            Op::Exists => value.is_some(),
            Op::NotExists => value.is_none(),
        }
    }
}

#[derive(Debug, Default)]
pub struct Filter {
    namespace: Option<String>,
    fields: Vec<Term>,
    labels: Vec<Term>,
}

impl Filter {
    pub fn new(namespace: Option<&str>, fields: Option<&str>, labels: Option<&str>) -> Result<Filter, ApiError> {
        Ok(Filter {
            namespace: namespace.map(str::to_string),
            fields: parts(fields.unwrap_or(""), ',').into_iter().map(field_term).collect::<Result<_, _>>()?,
            labels: parts(labels.unwrap_or(""), ',').into_iter().map(label_term).collect::<Result<_, _>>()?,
        })
    }

    pub fn matches(&self, obj: &Value) -> bool {
        let meta = &obj["metadata"];
        if self.namespace.as_deref().is_some_and(|ns| meta["namespace"].as_str() != Some(ns)) {
            return false;
        }
        let field_ok = self.fields.iter().all(|t| t.accepts(Some(&field_text(obj, &t.key))));
        field_ok && self.labels.iter().all(|t| t.accepts(meta["labels"][&t.key].as_str()))
    }
}

/// The text of the field at a dotted path: strings as they are, numbers and booleans
/// printed, anything missing "".
fn field_text(obj: &Value, path: &str) -> String {
    let v = path.split('.').fold(obj, |v, seg| &v[seg]);
    match v {
        Value::String(s) => s.clone(),
        Value::Null | Value::Array(_) | Value::Object(_) => String::new(),
        other => other.to_string(),
    }
}

/// `s` split at `sep` outside parentheses, trimmed, empty parts dropped.
fn parts(s: &str, sep: char) -> Vec<&str> {
    let (mut out, mut depth, mut start) = (Vec::new(), 0i32, 0);
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            c if c == sep && depth == 0 => {
                out.push(s[start..i].trim());
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(s[start..].trim());
    out.retain(|p| !p.is_empty());
    out
}

fn field_term(s: &str) -> Result<Term, ApiError> {
    let (key, op, value) = if let Some((k, v)) = s.split_once("!=") {
        (k, Op::Ne, v)
    } else if let Some((k, v)) = s.split_once("==").or_else(|| s.split_once('=')) {
        (k, Op::Eq, v)
    } else {
        return Err(ApiError::bad_request(format!("invalid field selector {s:?}: expected key=value or key!=value")));
    };
    Ok(Term { key: key.trim().to_string(), op, values: vec![value.trim().to_string()] })
}

fn label_term(s: &str) -> Result<Term, ApiError> {
    let term = |key: &str, op, values: Vec<String>| Ok(Term { key: key.trim().to_string(), op, values });
    if let Some((k, v)) = s.split_once(" notin ").or_else(|| s.split_once(" in ")) {
        let op = if s.contains(" notin ") { Op::NotIn } else { Op::In };
        let list = v.trim().strip_prefix('(').and_then(|v| v.strip_suffix(')'));
        let list = list.ok_or_else(|| ApiError::bad_request(format!("invalid label selector {s:?}: expected a (list)")))?;
        return term(k, op, parts(list, ',').into_iter().map(str::to_string).collect());
    }
    if let Some((k, v)) = s.split_once("!=") {
        return term(k, Op::Ne, vec![v.trim().to_string()]);
    }
    if let Some((k, v)) = s.split_once("==").or_else(|| s.split_once('=')) {
        return term(k, Op::Eq, vec![v.trim().to_string()]);
    }
    match s.strip_prefix('!') {
        Some(k) => term(k, Op::NotExists, vec![]),
        None => term(s, Op::Exists, vec![]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn selectors_as_the_api_server_reads_them() {
        let pod = |phase: &str, app: &str| json!({"metadata": {"namespace": "a", "labels": {"app": app}}, "status": {"phase": phase}});
        let f = Filter::new(None, Some("status.phase!=Succeeded,status.phase!=Failed"), None).unwrap();
        assert!(f.matches(&pod("Running", "web")) && !f.matches(&pod("Failed", "web")) && !f.matches(&pod("Succeeded", "web")));
        let f = Filter::new(Some("a"), None, Some("app in (web, db),!canary,tier!=x")).unwrap();
        assert!(f.matches(&pod("Running", "db")) && !f.matches(&pod("Running", "cache")));
        assert!(!Filter::new(Some("b"), None, None).unwrap().matches(&pod("Running", "db")));
        assert!(Filter::new(None, Some("status.phase"), None).is_err());
    }
}
