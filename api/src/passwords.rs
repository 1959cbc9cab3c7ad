//! What a new password must be, as Django's default validators have it: long enough, not
//! entirely numeric, not one of the 20,000 most common passwords, and not too similar to the
//! account's username or email. Each rule answers Django's own message.
use std::collections::HashSet;
use std::sync::LazyLock;

/// Fewest characters of a password.
pub const MIN_LENGTH: usize = 8;
/// Most bytes of a password (registration and login alike): argon2 hashes whatever it is
/// given, and a megabyte of password is only a way to burn CPU.
pub const MAX_BYTES: usize = 4096;
/// Django's `UserAttributeSimilarityValidator` threshold.
const MAX_SIMILARITY: f64 = 0.7;

/// Django's list (`django/contrib/auth/common-passwords.txt`, 20,000 lines, from Royce
/// Williams' list; BSD-licensed with Django), lower case, one a line.
static COMMON: LazyLock<HashSet<&'static str>> = LazyLock::new(|| {
    include_str!("../data/common-passwords.txt")
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect()
});

/// The problems of `password` for an account named `username` with `email`; empty when it may
/// be used.
pub fn problems(password: &str, username: &str, email: &str) -> Vec<&'static str> {
    let mut problems = Vec::new();
    if password.chars().count() < MIN_LENGTH {
        problems.push("This password is too short. It must contain at least 8 characters.");
    }
    if password.len() > MAX_BYTES {
        problems.push("This password is too long.");
        return problems;
    }
    let lowered: Vec<char> = password.to_lowercase().chars().collect();
    if too_similar(&lowered, username) {
        problems.push("The password is too similar to the username.");
    } else if email_parts(email).any(|part| too_similar(&lowered, part)) {
        problems.push("The password is too similar to the email address.");
    }
    if COMMON.contains(password.trim().to_lowercase().as_str()) {
        problems.push("This password is too common.");
    }
    if !password.is_empty() && password.chars().all(|c| c.is_ascii_digit()) {
        problems.push("This password is entirely numeric.");
    }
    problems
}

/// The email itself and its parts split at anything that is not a word character, as
/// Django compares them.
fn email_parts(email: &str) -> impl Iterator<Item = &str> {
    std::iter::once(email)
        .chain(email.split(|c: char| !(c.is_alphanumeric() || c == '_')))
        .filter(|part| !part.is_empty())
}

/// Whether `password` (lower case, as characters) is too like `attribute`.
fn too_similar(password: &[char], attribute: &str) -> bool {
    if attribute.is_empty() {
        return false;
    }
    let attribute: Vec<char> = attribute.to_lowercase().chars().collect();
    // Django's `exceeds_maximum_length_ratio` (its fix for CVE-2021-45115): a password ten
    // times longer than the attribute cannot reach the threshold, and comparing it would cost
    // length × length work on every registration.
    let (p, a) = (password.len() as f64, attribute.len() as f64);
    if p >= 10.0 * a && a < MAX_SIMILARITY / 2.0 * p {
        return false;
    }
    similarity(password, &attribute) >= MAX_SIMILARITY
}

/// Python's `difflib.SequenceMatcher(a, b).ratio()`: twice the characters of the matching
/// blocks (longest common substring, then the same on either side of it) over both lengths.
fn similarity(a: &[char], b: &[char]) -> f64 {
    let total = a.len() + b.len();
    if total == 0 {
        return 1.0;
    }
    2.0 * matching(a, b) as f64 / total as f64
}

fn matching(a: &[char], b: &[char]) -> usize {
    let (i, j, k) = longest_common_substring(a, b);
    if k == 0 {
        return 0;
    }
    k + matching(&a[..i], &b[..j]) + matching(&a[i + k..], &b[j + k..])
}

/// Start in `a`, start in `b` and length of the first longest common substring.
fn longest_common_substring(a: &[char], b: &[char]) -> (usize, usize, usize) {
    let mut best = (0, 0, 0);
    // lengths[j + 1]: length of the common substring ending at a[i], b[j].
    let mut lengths = vec![0usize; b.len() + 1];
    for (i, ca) in a.iter().enumerate() {
        let mut previous = 0;
        for (j, cb) in b.iter().enumerate() {
            let here = lengths[j + 1];
            lengths[j + 1] = if ca == cb { previous + 1 } else { 0 };
            if lengths[j + 1] > best.2 {
                best = (
                    i + 1 - lengths[j + 1],
                    j + 1 - lengths[j + 1],
                    lengths[j + 1],
                );
            }
            previous = here;
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_list_holds_twenty_thousand_lines_and_common_passwords_are_refused() {
        assert_eq!(
            include_str!("../data/common-passwords.txt").lines().count(),
            20_000
        );
        assert!(problems("password1", "alice", "").contains(&"This password is too common."));
        assert!(problems("Qwertyuiop", "alice", "").contains(&"This password is too common."));
        assert!(problems("correct horse", "alice", "").is_empty());
    }

    #[test]
    fn numeric_short_and_similar_passwords_are_refused_with_djangos_words() {
        assert!(
            problems("73620194815", "alice", "").contains(&"This password is entirely numeric.")
        );
        assert_eq!(
            problems("x7!", "alice", ""),
            ["This password is too short. It must contain at least 8 characters."]
        );
        assert_eq!(
            problems("margaret-thatcher", "margaretthatcher", ""),
            ["The password is too similar to the username."]
        );
        assert_eq!(
            problems("Wanderlust42x", "bob", "wanderlust42@example.com"),
            ["The password is too similar to the email address."]
        );
        assert!(problems("orange tractor 42", "margaret", "m@example.com").is_empty());
    }

    #[test]
    fn similarity_is_pythons_sequence_matcher_ratio() {
        let chars = |s: &str| s.chars().collect::<Vec<_>>();
        // difflib.SequenceMatcher(None, a, b).ratio() for each pair.
        for (a, b, ratio) in [
            ("abcd", "bcde", 0.75),
            ("alice", "alice123", 0.769_230_769_230_769_2),
            ("qwerty", "asdfgh", 0.0),
            (
                "margaretthatcher",
                "margaret-thatcher",
                0.969_696_969_696_969_7,
            ),
        ] {
            let got = similarity(&chars(a), &chars(b));
            assert!((got - ratio).abs() < 1e-9, "{a} {b}: {got} != {ratio}");
        }
    }
}
