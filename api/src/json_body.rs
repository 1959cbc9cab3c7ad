//! Reading a JSON object into a request type, with errors in JSON's words: a value of the wrong
//! type names its field and the JSON type expected (`"Expected a string, got an integer."`),
//! never the Rust type it was to become (`expected struct SendMessageRequest`, `u32`).
use serde::Deserialize;
use serde::de::DeserializeOwned;

use crate::error::{ApiError, FieldErrors};

/// What a body or a WebSocket frame that is JSON but not an object is told.
pub const NOT_AN_OBJECT: &str = "Invalid data: expected a JSON object";

/// Whether `text` can only be a JSON object: its first character other than JSON whitespace
/// is `{` (whether the rest is valid is the parser's to say).
pub fn is_json_object(text: &[u8]) -> bool {
    text.iter()
        .find(|b| !matches!(b, b' ' | b'\t' | b'\n' | b'\r'))
        .is_some_and(|&b| b == b'{')
}

/// Why a body could not be read.
#[derive(Debug, PartialEq, Eq)]
pub enum BodyError {
    /// Not JSON at all (the parser's message, with its line and column).
    Syntax(String),
    /// JSON, but not an object.
    NotAnObject,
    /// An object whose `field` (a path such as `members[2]`, or the missing field's name)
    /// is wrong: `problem` says how.
    Field { field: String, problem: String },
}

impl BodyError {
    /// One line, for a WebSocket `error` event.
    pub fn message(&self) -> String {
        match self {
            BodyError::Syntax(detail) => format!("Invalid JSON: {detail}"),
            BodyError::NotAnObject => NOT_AN_OBJECT.to_owned(),
            BodyError::Field { field, problem } => format!("Invalid data: {field}: {problem}"),
        }
    }
}

impl From<BodyError> for ApiError {
    fn from(err: BodyError) -> Self {
        match err {
            BodyError::Field { field, problem } => FieldErrors::single(&field, problem),
            other => ApiError::BadRequest(other.message()),
        }
    }
}

/// For a field that tells `null` from absent (`#[serde(default, deserialize_with =
/// "crate::json_body::explicit")]` on an `Option<Option<T>>`): `Some(None)` for an explicit
/// `null`, `None` (the default) when the field is absent.
pub fn explicit<'de, T, D>(d: D) -> Result<Option<Option<T>>, D::Error>
where
    T: serde::Deserialize<'de>,
    D: serde::Deserializer<'de>,
{
    Ok(Some(Option::deserialize(d)?))
}

/// Parses `bytes` as a JSON object into `T`.
pub fn parse_object<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, BodyError> {
    if !is_json_object(bytes) {
        // Arrays and scalars included: serde would read an array as a struct's fields in order.
        return Err(
            match serde_json::from_slice::<serde::de::IgnoredAny>(bytes) {
                Ok(_) => BodyError::NotAnObject,
                Err(err) => BodyError::Syntax(err.to_string()),
            },
        );
    }
    let mut deserializer = serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize::<_, T>(&mut deserializer).map_err(|err| {
        let path = err.path().to_string();
        let inner = err.into_inner();
        if inner.is_data() {
            describe(&path, &inner)
        } else {
            BodyError::Syntax(inner.to_string())
        }
    })?;
    deserializer
        .end()
        .map_err(|err| BodyError::Syntax(err.to_string()))?;
    Ok(value)
}

/// Turns serde's message about the value at `path` into a field and a problem in JSON words.
fn describe(path: &str, err: &serde_json::Error) -> BodyError {
    let text = err.to_string();
    // serde_json appends " at line L column C"; the field name says where.
    let message = text
        .rsplit_once(" at line ")
        .map(|(message, _)| message)
        .unwrap_or(&text);
    let at_root = path == "." || path.is_empty();
    if let Some(rest) = message.strip_prefix("missing field `") {
        let name = rest.split('`').next().unwrap_or(rest);
        let field = if at_root {
            name.to_owned()
        } else {
            format!("{path}.{name}")
        };
        return BodyError::Field {
            field,
            problem: "This field is required.".into(),
        };
    }
    let field = if at_root { "body" } else { path }.to_owned();
    let problem = if let Some((got, expected)) = message
        .strip_prefix("invalid type: ")
        .and_then(|rest| rest.split_once(", expected "))
    {
        format!(
            "Expected {}, got {}.",
            json_expected(expected),
            json_unexpected(got)
        )
    } else if let Some((got, expected)) = message
        .strip_prefix("invalid value: ")
        .and_then(|rest| rest.split_once(", expected "))
    {
        format!(
            "Expected {}, got {}.",
            json_expected(expected),
            got.replace('`', "")
        )
    } else if let Some(rest) = message.strip_prefix("unknown variant ") {
        format!("Unknown value {}.", rest.replace('`', "\""))
    } else if let Some(rest) = message.strip_prefix("unknown field ") {
        format!("Unknown field {}.", rest.replace('`', "\""))
    } else {
        let mut custom = message.to_owned();
        if !custom.ends_with('.') {
            custom.push('.');
        }
        custom
    };
    BodyError::Field { field, problem }
}

/// serde's name of what a type expects, as a JSON type.
fn json_expected(expected: &str) -> String {
    let plain = match expected {
        "a string" | "a borrowed string" | "string" | "a character" | "char" => "a string",
        "i8" | "i16" | "i32" | "i64" | "i128" | "isize" => "an integer",
        "u8" | "u16" | "u32" | "u64" | "u128" | "usize" => "a non-negative integer",
        "f32" | "f64" => "a number",
        "a boolean" | "bool" => "true or false",
        "a sequence" | "a tuple" => "an array",
        "a map" => "an object",
        "unit" => "null",
        other if other.starts_with("struct ") || other.starts_with("a map") => "an object",
        other if other.starts_with("tuple") || other.starts_with("an array") => "an array",
        other if other.starts_with("enum ") || other == "variant identifier" => {
            "one of the documented values"
        }
        other => return other.replace('`', "\""),
    };
    plain.to_owned()
}

/// serde_json's description of the value it found, as a JSON type.
fn json_unexpected(got: &str) -> &'static str {
    match got.split_whitespace().next().unwrap_or_default() {
        "integer" => "an integer",
        "floating" => "a number",
        "string" => "a string",
        "boolean" => "a boolean",
        "null" | "unit" => "null",
        "sequence" => "an array",
        "map" => "an object",
        _ => "another type",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize)]
    #[allow(dead_code)]
    struct Send {
        content: String,
        limit: Option<u32>,
        flag: Option<bool>,
        members: Option<Vec<i64>>,
    }

    fn problem(body: &str) -> BodyError {
        parse_object::<Send>(body.as_bytes()).expect_err("refused")
    }

    fn field(field: &str, problem: &str) -> BodyError {
        BodyError::Field {
            field: field.into(),
            problem: problem.into(),
        }
    }

    #[test]
    fn type_errors_name_the_field_and_the_json_types() {
        assert_eq!(
            problem(r#"{"content": 5}"#),
            field("content", "Expected a string, got an integer.")
        );
        assert_eq!(
            problem(r#"{"content": "x", "limit": "ten"}"#),
            field("limit", "Expected a non-negative integer, got a string.")
        );
        assert_eq!(
            problem(r#"{"content": "x", "limit": -1}"#),
            field("limit", "Expected a non-negative integer, got integer -1.")
        );
        assert_eq!(
            problem(r#"{"content": "x", "flag": 1.5}"#),
            field("flag", "Expected true or false, got a number.")
        );
        assert_eq!(
            problem(r#"{"content": "x", "members": [1, "two"]}"#),
            field("members[1]", "Expected an integer, got a string.")
        );
        assert_eq!(
            problem(r#"{"content": {"a": 1}}"#),
            field("content", "Expected a string, got an object.")
        );
        assert_eq!(
            problem(r#"{"content": null}"#),
            field("content", "Expected a string, got null.")
        );
        assert_eq!(problem("{}"), field("content", "This field is required."));
    }

    #[test]
    fn no_rust_words_reach_the_client() {
        for body in [
            r#"{"content": 5}"#,
            r#"{"content": "x", "limit": 1e99}"#,
            r#"{"content": "x", "members": {}}"#,
            r#"{"content": "x", "limit": 4294967296}"#,
        ] {
            let message = problem(body).message();
            for word in ["struct", "u32", "i64", "Send", "sequence", "map"] {
                assert!(!message.contains(word), "{body}: {message}");
            }
        }
    }

    #[test]
    fn not_json_and_not_objects_are_told_apart() {
        assert!(matches!(problem("{"), BodyError::Syntax(_)));
        assert!(matches!(
            problem(r#"{"content": "x"} extra"#),
            BodyError::Syntax(_)
        ));
        assert_eq!(problem("[1]"), BodyError::NotAnObject);
        assert_eq!(problem("\"x\""), BodyError::NotAnObject);
        assert!(matches!(problem("nope"), BodyError::Syntax(_)));
    }
}
