//! The one `value_template` shape onboardd evaluates: `{{ value_json.KEY }}` or
//! `{{ value_json['KEY'] }}`, optionally piped through `float`, `int` or
//! `round(N)`. Zigbee2MQTT, Tasmota's HA mode and most generators emit exactly
//! this; anything else would need a Jinja engine, so such an entity is skipped
//! (with one warning) rather than forwarded wrong.

use serde::{Deserialize, Serialize};
use serde_json::{Number, Value};

/// A filter applied after the key is taken, as Home Assistant would.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Filter {
    Float,
    Int,
    Round(u32),
}

/// How an entity's value is read from its state message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Rule {
    /// No template: the whole payload is the value.
    Plain,
    /// `value_json.KEY`: one key of a JSON object state.
    Key { key: String, filter: Option<Filter> },
}

/// Parses a template; `None` when it is not the supported subset.
pub fn parse(template: &str) -> Option<Rule> {
    let inner = template
        .trim()
        .strip_prefix("{{")?
        .strip_suffix("}}")?
        .trim();
    let (expr, filter) = match inner.split_once('|') {
        Some((e, f)) => (e.trim(), Some(parse_filter(f.trim())?)),
        None => (inner, None),
    };
    let rest = expr.strip_prefix("value_json")?;
    let key = if let Some(k) = rest.strip_prefix('.') {
        let ok = !k.is_empty()
            && !k.starts_with(|c: char| c.is_ascii_digit())
            && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        ok.then(|| k.to_string())?
    } else {
        let quoted = rest.strip_prefix('[')?.strip_suffix(']')?.trim();
        let q = quoted.chars().next()?;
        if q != '\'' && q != '"' {
            return None;
        }
        let k = quoted.strip_prefix(q)?.strip_suffix(q)?;
        if k.is_empty() || k.contains(q) || k.contains('\\') {
            return None;
        }
        k.to_string()
    };
    Some(Rule::Key { key, filter })
}

fn parse_filter(f: &str) -> Option<Filter> {
    match f {
        "float" => Some(Filter::Float),
        "int" => Some(Filter::Int),
        "round" => Some(Filter::Round(0)),
        _ => {
            let n = f.strip_prefix("round(")?.strip_suffix(')')?.trim();
            // HA's round takes a precision; a second argument (method) is not ours.
            n.parse::<u32>()
                .ok()
                .filter(|n| *n <= 15)
                .map(Filter::Round)
        }
    }
}

/// A plain payload as a value: a number when it parses as one, else the string.
pub fn plain(payload: &str) -> Value {
    let t = payload.trim();
    if let Ok(i) = t.parse::<i64>() {
        return Value::from(i);
    }
    match t.parse::<f64>() {
        Ok(f) if f.is_finite() => Number::from_f64(f).map_or(Value::from(t), Value::Number),
        _ => Value::from(t),
    }
}

/// Takes the rule's value from a state payload; `None` when the state does not
/// hold it (that entity contributes no key to this reading).
pub fn evaluate(rule: &Rule, payload: &str, json: Option<&Value>) -> Option<Value> {
    match rule {
        Rule::Plain => Some(plain(payload)),
        Rule::Key { key, filter } => {
            let v = json?.as_object()?.get(key)?;
            match filter {
                None => Some(v.clone()),
                Some(f) => apply(*f, v),
            }
        }
    }
}

/// HA's `float`/`int` filters turn what they cannot convert into 0 (their
/// default); an object or array is not a reading, so it is left out instead.
fn apply(f: Filter, v: &Value) -> Option<Value> {
    let x = match v {
        Value::Number(n) => n.as_f64()?,
        Value::String(s) => s.trim().parse::<f64>().unwrap_or(0.0),
        Value::Bool(b) => f64::from(u8::from(*b)),
        Value::Null => 0.0,
        _ => return None,
    };
    let x = if x.is_finite() { x } else { 0.0 };
    match f {
        Filter::Float => Number::from_f64(x).map(Value::Number),
        Filter::Int => Some(Value::from(x.trunc() as i64)),
        Filter::Round(0) => Number::from_f64(x.round()).map(Value::Number),
        Filter::Round(n) => {
            let m = 10f64.powi(n as i32);
            Number::from_f64((x * m).round() / m).map(Value::Number)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn key(k: &str, f: Option<Filter>) -> Option<Rule> {
        Some(Rule::Key {
            key: k.into(),
            filter: f,
        })
    }

    #[test]
    fn the_supported_template_shapes_parse() {
        assert_eq!(
            parse("{{ value_json.temperature }}"),
            key("temperature", None)
        );
        assert_eq!(
            parse("{{value_json.temperature}}"),
            key("temperature", None)
        );
        assert_eq!(parse("{{ value_json['co2'] }}"), key("co2", None));
        assert_eq!(parse("{{ value_json[\"a b\"] }}"), key("a b", None));
        assert_eq!(
            parse("{{ value_json.t | float }}"),
            key("t", Some(Filter::Float))
        );
        assert_eq!(parse("{{ value_json.t|int }}"), key("t", Some(Filter::Int)));
        assert_eq!(
            parse("{{ value_json.t | round(1) }}"),
            key("t", Some(Filter::Round(1)))
        );
    }

    #[test]
    fn other_templates_are_not_evaluated() {
        for t in [
            "{{ value }}",
            "{{ value_json.a.b }}",
            "{{ value_json.t | float | round(1) }}",
            "{{ value_json.t * 10 }}",
            "{% if value_json.t %}1{% endif %}",
            "{{ value_json['a'] }} x",
            "{{ value_json.t | default(0) }}",
            "{{ value_json.state }} {{ value }}",
        ] {
            assert_eq!(parse(t), None, "{t}");
        }
    }

    #[test]
    fn filters_apply_as_home_assistant_would() {
        let state = json!({"t": "21.46", "n": 3.7, "b": true});
        let r = |t: &str| evaluate(&parse(t).unwrap(), "", Some(&state));
        assert_eq!(r("{{ value_json.t | float }}"), Some(json!(21.46)));
        assert_eq!(r("{{ value_json.n | int }}"), Some(json!(3)));
        assert_eq!(r("{{ value_json.t | round(1) }}"), Some(json!(21.5)));
        assert_eq!(r("{{ value_json.b | int }}"), Some(json!(1)));
        assert_eq!(r("{{ value_json.t }}"), Some(json!("21.46")));
        assert_eq!(r("{{ value_json.missing }}"), None);
    }

    #[test]
    fn plain_values_are_numbers_when_they_parse_as_one() {
        assert_eq!(plain("21.4"), json!(21.4));
        assert_eq!(plain(" 7\n"), json!(7));
        assert_eq!(plain("ON"), json!("ON"));
        assert_eq!(plain("nan"), json!("nan"));
    }
}
