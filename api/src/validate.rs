//! Field rules shared by several routes; each adds its problems to a `FieldErrors`. The text
//! rule also answers a typed [`TextProblem`], for a caller that words it its own way (the
//! WebSocket's send).
use crate::error::FieldErrors;

pub const REQUIRED: &str = "This field is required.";
pub const BLANK: &str = "This field may not be blank.";
/// PostgreSQL text cannot hold U+0000, so no text field may carry it.
pub const NULL_CHARACTER: &str = "Null characters are not allowed.";

/// Years a time may fall in: PostgreSQL's `timestamptz` starts in 4713 BC, and chrono reads
/// years of any length it cannot hold.
pub const TIME_OUT_OF_RANGE: &str = "Must be a time between the years 1 and 9999.";

/// Whether PostgreSQL can take `time` (and the years around it are ones a chat can have).
pub fn storable_time(time: &chrono::DateTime<chrono::Utc>) -> bool {
    (1..=9999).contains(&chrono::Datelike::year(time))
}

/// Adds the error when `value` holds a NUL character; true when it is clean.
pub fn no_nul(errors: &mut FieldErrors, field: &str, value: &str) -> bool {
    if value.contains('\0') {
        errors.add(field, NULL_CHARACTER);
        false
    } else {
        true
    }
}

/// Why a text field was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TextProblem {
    Missing,
    Nul,
    Blank,
    TooLong { max: usize },
}

impl TextProblem {
    /// The field error a REST client reads.
    pub fn field_error(self) -> String {
        match self {
            TextProblem::Missing => REQUIRED.to_owned(),
            TextProblem::Nul => NULL_CHARACTER.to_owned(),
            TextProblem::Blank => BLANK.to_owned(),
            TextProblem::TooLong { max } => {
                format!("Ensure this field has no more than {max} characters.")
            }
        }
    }
}

/// The text rule: present, no NUL, not blank, at most `max` characters; the value is kept as
/// sent (not trimmed). A value holding NUL is never blank (NUL is not whitespace), so the
/// order of those two checks decides nothing.
pub fn check_text(value: Option<&str>, max: usize) -> Result<&str, TextProblem> {
    let value = value.ok_or(TextProblem::Missing)?;
    if value.contains('\0') {
        Err(TextProblem::Nul)
    } else if value.trim().is_empty() {
        Err(TextProblem::Blank)
    } else if value.chars().count() > max {
        Err(TextProblem::TooLong { max })
    } else {
        Ok(value)
    }
}

/// A required text field (see [`check_text`]): the value when valid, else its error added.
pub fn required_text<'a>(
    errors: &mut FieldErrors,
    field: &str,
    value: Option<&'a str>,
    max: usize,
) -> Option<&'a str> {
    match check_text(value, max) {
        Ok(value) => Some(value),
        Err(problem) => {
            errors.add(field, problem.field_error());
            None
        }
    }
}

/// A text field that was sent (see [`check_text`]): the value when valid, else its error added.
pub fn optional_text<'a>(
    errors: &mut FieldErrors,
    field: &str,
    value: &'a str,
    max: usize,
) -> Option<&'a str> {
    required_text(errors, field, Some(value), max)
}

/// What a value outside `min..=max` is told.
pub fn out_of_range(min: i64, max: i64) -> String {
    format!("Ensure this value is between {min} and {max}.")
}

/// An integer in `min..=max`.
pub fn in_range(errors: &mut FieldErrors, field: &str, value: i64, min: i64, max: i64) -> bool {
    if (min..=max).contains(&value) {
        true
    } else {
        errors.add(field, out_of_range(min, max));
        false
    }
}

/// A username as it is stored and looked up: NFKC-normalized, so that look-alike spellings
/// (full-width letters, ligatures, composed and decomposed accents) are one account, as
/// Django's `AbstractBaseUser.normalize_username` has it.
pub fn normalize_username(username: &str) -> String {
    use unicode_normalization::UnicodeNormalization;
    username.nfkc().collect()
}

pub fn username(errors: &mut FieldErrors, value: Option<&str>) {
    let Some(name) = required_text(errors, "username", value, 150) else {
        return;
    };
    if !name
        .chars()
        .all(|c| c.is_alphanumeric() || "@.+-_".contains(c))
    {
        errors.add(
            "username",
            "Enter a valid username. This value may contain only letters, numbers, and @/./+/-/_ characters.",
        );
    }
}

pub fn email(errors: &mut FieldErrors, value: &str) {
    if value.is_empty() || !no_nul(errors, "email", value) {
        return;
    }
    let valid = value.chars().count() <= 254
        && !value.chars().any(char::is_whitespace)
        && value.split_once('@').is_some_and(|(local, domain)| {
            !local.is_empty()
                && domain.contains('.')
                && !domain.starts_with('.')
                && !domain.ends_with('.')
                && !domain.contains('@')
        });
    if !valid {
        errors.add("email", "Enter a valid email address.");
    }
}

/// A new password: the `problems` Django's default validators found in it
/// ([`Hashing::password_problems`](crate::hashing::Hashing::password_problems)), then the
/// confirmation.
pub fn password(
    errors: &mut FieldErrors,
    password: Option<&str>,
    confirm: Option<&str>,
    problems: Vec<&'static str>,
) {
    let Some(p) = password else {
        errors.add("password", REQUIRED);
        return;
    };
    if problems.is_empty() && confirm != Some(p) {
        errors.add("password", "Password fields didn't match.");
    }
    for problem in problems {
        errors.add("password", problem);
    }
}
