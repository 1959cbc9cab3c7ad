//! The model registry: every model an AI chat may use, where it is served, with which key,
//! how large its window is, what it costs and what to try when it fails.
//!
//! From `MODELS_FILE` (TOML, `models.example.toml`) when set; otherwise the one endpoint of
//! `OPENAI_BASE_URL`/`OPENAI_API_KEY` serving `OPENAI_MODEL` and `ALLOWED_MODELS`, as before
//! the registry existed. Whatever is wrong with the file stops the process at start-up with a
//! message naming the line: a model that cannot be reached should not be found out by a user.
use std::collections::HashSet;
use std::fmt;

use secrecy::SecretString;
use toml_edit::{Document, Item, Table, Value};

/// A price per million tokens, as an exact decimal: `units / 10^scale`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Price {
    units: i128,
    scale: u32,
}

/// The longest model name there is: chats and replies store it in a `varchar(100)`.
pub const MAX_MODEL_NAME_CHARS: usize = 100;

/// Most digits after the point a price may have.
const MAX_PRICE_SCALE: u32 = 12;
/// Most digits a price may have in all (so costs stay far inside `i128`).
const MAX_PRICE_DIGITS: usize = 18;

impl Price {
    /// A non-negative decimal such as `2.50` or `0.15`.
    pub fn parse(text: &str) -> Option<Price> {
        let text = text.trim();
        let (whole, fraction) = text.split_once('.').unwrap_or((text, ""));
        let digits = whole.len() + fraction.len();
        if whole.is_empty()
            || digits > MAX_PRICE_DIGITS
            || fraction.len() > MAX_PRICE_SCALE as usize
            || !whole
                .bytes()
                .chain(fraction.bytes())
                .all(|b| b.is_ascii_digit())
            || (text.contains('.') && fraction.is_empty())
        {
            return None;
        }
        let units = format!("{whole}{fraction}").parse::<i128>().ok()?;
        Some(Price {
            units,
            scale: u32::try_from(fraction.len()).ok()?,
        })
    }

    fn units_at(self, scale: u32) -> i128 {
        self.units * 10i128.pow(scale - self.scale)
    }
}

impl fmt::Display for Price {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&decimal(self.units, self.scale))
    }
}

/// `units / 10^scale` written out exactly, without trailing zeros after the point.
fn decimal(units: i128, scale: u32) -> String {
    let divisor = 10i128.pow(scale);
    let whole = units / divisor;
    let fraction = units % divisor;
    if fraction == 0 {
        return whole.to_string();
    }
    let fraction = format!("{fraction:0width$}", width = scale as usize);
    format!("{whole}.{}", fraction.trim_end_matches('0'))
}

/// What a model's tokens cost.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pricing {
    /// Per million prompt tokens.
    pub input: Price,
    /// Per million completion tokens.
    pub output: Price,
    /// ISO 4217 code, e.g. `USD`.
    pub currency: String,
}

impl Pricing {
    /// The exact cost of a reply, as a decimal string in `currency`.
    pub fn cost(&self, prompt_tokens: u64, completion_tokens: u64) -> String {
        let scale = self.input.scale.max(self.output.scale);
        let units = i128::from(prompt_tokens) * self.input.units_at(scale)
            + i128::from(completion_tokens) * self.output.units_at(scale);
        // Prices are per million tokens.
        decimal(units, scale + 6)
    }
}

/// One model of the registry.
#[derive(Clone)]
pub struct Model {
    /// What AI chats name.
    pub name: String,
    /// The OpenAI-compatible server, e.g. `https://api.openai.com/v1`.
    pub base_url: String,
    /// The environment variable holding its key (`None`: no key, e.g. a local server).
    pub api_key_env: Option<String>,
    /// The key, read from `api_key_env` when the registry was loaded with keys.
    pub api_key: Option<SecretString>,
    /// The provider's name for it (sent as `model` in requests).
    pub provider_model: String,
    /// Tokens of prompt and reply together the model accepts (`None`: unknown, only
    /// `CONTEXT_TOKEN_BUDGET` bounds the prompt).
    pub context_window: Option<u64>,
    /// Most tokens of one reply (sent as `max_completion_tokens`).
    pub max_completion_tokens: u32,
    /// Requests and tokens per rate-limit window (`None`: `RATE_LIMIT_RPM`/`RATE_LIMIT_TPM`).
    pub rpm: Option<u64>,
    pub tpm: Option<u64>,
    /// `None`: its replies have no cost.
    pub pricing: Option<Pricing>,
    /// Tried in order when it fails before its first token.
    pub fallbacks: Vec<String>,
    /// Line of its `name` in the file (0 for the model of the environment).
    pub line: usize,
}

impl fmt::Debug for Model {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Model")
            .field("name", &self.name)
            .field("base_url", &self.base_url)
            .field("api_key_env", &self.api_key_env)
            .field("api_key", &self.api_key.as_ref().map(|_| "[redacted]"))
            .field("provider_model", &self.provider_model)
            .field("context_window", &self.context_window)
            .field("max_completion_tokens", &self.max_completion_tokens)
            .field("rpm", &self.rpm)
            .field("tpm", &self.tpm)
            .field("pricing", &self.pricing)
            .field("fallbacks", &self.fallbacks)
            .finish()
    }
}

impl Model {
    /// Most tokens of prompt this model is sent: its window less its reply cap, and never more
    /// than `budget` (`CONTEXT_TOKEN_BUDGET`).
    pub fn prompt_budget(&self, budget: u64) -> u64 {
        match self.context_window {
            Some(window) => {
                budget.min(window.saturating_sub(u64::from(self.max_completion_tokens)))
            }
            None => budget,
        }
    }
}

/// The models of a deployment; never empty.
#[derive(Debug, Clone)]
pub struct Registry {
    models: Vec<Model>,
    default: usize,
}

/// Why the registry cannot be used; the message names the file and line.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct RegistryError(String);

impl RegistryError {
    pub fn new(message: String) -> Self {
        RegistryError(message)
    }
}

/// What the environment gave when there is no `MODELS_FILE`.
pub struct EnvironmentModels<'a> {
    pub default: &'a str,
    pub others: &'a [String],
    pub base_url: &'a str,
    pub api_key: Option<&'a SecretString>,
    pub max_completion_tokens: u32,
}

/// Whether loading reads the keys' environment variables (the worker, which calls models) or
/// not (the API, which only names them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keys {
    Read,
    Skip,
}

impl Registry {
    /// The registry of the environment: one endpoint, `default` first, then `others`.
    pub fn from_environment(env: EnvironmentModels<'_>) -> Registry {
        let mut names = vec![env.default.to_owned()];
        for name in env.others {
            let name = name.trim();
            if !name.is_empty() && !names.iter().any(|n| n == name) {
                names.push(name.to_owned());
            }
        }
        let models = names
            .into_iter()
            .map(|name| Model {
                provider_model: name.clone(),
                name,
                base_url: env.base_url.to_owned(),
                api_key_env: Some("OPENAI_API_KEY".to_owned()),
                api_key: env.api_key.cloned(),
                context_window: None,
                max_completion_tokens: env.max_completion_tokens,
                rpm: None,
                tpm: None,
                pricing: None,
                fallbacks: Vec::new(),
                line: 0,
            })
            .collect();
        Registry { models, default: 0 }
    }

    /// Parses and checks a registry file. `source` names it in errors; `lookup` reads an
    /// environment variable; `default_completion` is `MAX_COMPLETION_TOKENS`.
    pub fn parse(
        text: &str,
        source: &str,
        keys: Keys,
        lookup: impl Fn(&str) -> Option<String>,
        default_completion: u32,
    ) -> Result<Registry, RegistryError> {
        let doc = Document::parse(text)
            .map_err(|err| RegistryError(format!("{source}: not valid TOML: {err}")))?;
        let file = File { text, source };
        let root = doc.as_table();
        for (key, item) in root.iter() {
            if key != "default" && key != "models" {
                return Err(file.error(
                    item.span(),
                    format!("unknown key `{key}` (expected `default` and `[[models]]`)"),
                ));
            }
        }
        let Some(tables) = root.get("models").and_then(Item::as_array_of_tables) else {
            return Err(file.error(
                root.get("models").and_then(Item::span),
                "no models: add at least one `[[models]]` table".into(),
            ));
        };
        let mut models: Vec<Model> = Vec::new();
        let mut fallback_lines = Vec::new();
        for table in tables.iter() {
            let (model, lines) = file.model(table, keys, &lookup, default_completion)?;
            if models.iter().any(|m| m.name == model.name) {
                return Err(
                    file.error_at(model.line, format!("model `{}` listed twice", model.name))
                );
            }
            models.push(model);
            fallback_lines.push(lines);
        }
        if models.is_empty() {
            return Err(file.error(
                root.get("models").and_then(Item::span),
                "no models: add at least one `[[models]]` table".into(),
            ));
        }
        for (model, lines) in models.iter().zip(&fallback_lines) {
            for (fallback, line) in model.fallbacks.iter().zip(lines) {
                if !models.iter().any(|m| &m.name == fallback) {
                    return Err(file.error_at(
                        *line,
                        format!(
                            "model `{}` falls back to `{fallback}`, which is not in the file",
                            model.name
                        ),
                    ));
                }
                if fallback == &model.name {
                    return Err(file.error_at(
                        *line,
                        format!("model `{}` falls back to itself", model.name),
                    ));
                }
            }
        }
        let default = match root.get("default") {
            None => 0,
            Some(item) => {
                let name = item.as_str().ok_or_else(|| {
                    file.error(
                        item.span(),
                        "`default` must be a model name (a string)".into(),
                    )
                })?;
                models.iter().position(|m| m.name == name).ok_or_else(|| {
                    file.error(
                        item.span(),
                        format!("`default` names `{name}`, which is not in the file"),
                    )
                })?
            }
        };
        let registry = Registry { models, default };
        registry.check_cycles(&file)?;
        Ok(registry)
    }

    /// Every model, in the file's order.
    pub fn models(&self) -> &[Model] {
        &self.models
    }

    /// The model of chats that name none.
    pub fn default_model(&self) -> &Model {
        &self.models[self.default]
    }

    pub fn get(&self, name: &str) -> Option<&Model> {
        self.models.iter().find(|m| m.name == name)
    }

    /// Whether an AI chat may name `model` (the empty name stands for the default).
    pub fn is_allowed(&self, model: &str) -> bool {
        model.is_empty() || self.get(model).is_some()
    }

    /// The model a chat naming `model` is answered by: its own, or the default for the empty
    /// name or one the registry no longer has.
    pub fn resolve(&self, model: &str) -> &Model {
        self.get(model).unwrap_or_else(|| self.default_model())
    }

    /// `model`, then what it falls back to, in order: each fallback followed by its own
    /// fallbacks (depth first), every model once.
    pub fn chain<'a>(&'a self, model: &'a Model) -> Vec<&'a Model> {
        fn visit<'a>(registry: &'a Registry, model: &'a Model, out: &mut Vec<&'a Model>) {
            if out.iter().any(|m| m.name == model.name) {
                return;
            }
            out.push(model);
            for name in &model.fallbacks {
                if let Some(next) = registry.get(name) {
                    visit(registry, next, out);
                }
            }
        }
        let mut out = Vec::new();
        visit(self, model, &mut out);
        out
    }

    /// The largest reply cap of any model (what one send may cost at most, with the prompt).
    pub fn most_completion_tokens(&self) -> u32 {
        self.models
            .iter()
            .map(|m| m.max_completion_tokens)
            .max()
            .unwrap_or(0)
    }

    /// A fallback path that comes back to where it started is refused: it names a
    /// misunderstanding of what the file says.
    fn check_cycles(&self, file: &File<'_>) -> Result<(), RegistryError> {
        fn walk(
            registry: &Registry,
            name: &str,
            path: &mut Vec<String>,
            done: &mut HashSet<String>,
        ) -> Option<Vec<String>> {
            if let Some(start) = path.iter().position(|n| n == name) {
                let mut cycle = path[start..].to_vec();
                cycle.push(name.to_owned());
                return Some(cycle);
            }
            if done.contains(name) {
                return None;
            }
            path.push(name.to_owned());
            if let Some(model) = registry.get(name) {
                for next in &model.fallbacks {
                    if let Some(cycle) = walk(registry, next, path, done) {
                        return Some(cycle);
                    }
                }
            }
            path.pop();
            done.insert(name.to_owned());
            None
        }
        let mut done = HashSet::new();
        for model in &self.models {
            if let Some(cycle) = walk(self, &model.name, &mut Vec::new(), &mut done) {
                let line = self.get(&cycle[0]).map_or(0, |m| m.line);
                return Err(file.error_at(
                    line,
                    format!("fallbacks go round in a cycle: {}", cycle.join(" → ")),
                ));
            }
        }
        Ok(())
    }
}

/// The file being read, for messages that name a line.
struct File<'a> {
    text: &'a str,
    source: &'a str,
}

/// Keys a `[[models]]` table may have.
const MODEL_KEYS: [&str; 12] = [
    "name",
    "base_url",
    "api_key_env",
    "provider_model",
    "context_window",
    "max_completion_tokens",
    "rpm",
    "tpm",
    "input_price",
    "output_price",
    "currency",
    "fallbacks",
];

impl File<'_> {
    fn line_of(&self, offset: usize) -> usize {
        self.text[..offset.min(self.text.len())]
            .matches('\n')
            .count()
            + 1
    }

    fn error(&self, span: Option<std::ops::Range<usize>>, message: String) -> RegistryError {
        self.error_at(span.map_or(0, |s| self.line_of(s.start)), message)
    }

    fn error_at(&self, line: usize, message: String) -> RegistryError {
        if line == 0 {
            RegistryError(format!("{}: {message}", self.source))
        } else {
            RegistryError(format!("{}, line {line}: {message}", self.source))
        }
    }

    /// One `[[models]]` table, and the line of each of its fallbacks.
    fn model(
        &self,
        table: &Table,
        keys: Keys,
        lookup: &impl Fn(&str) -> Option<String>,
        default_completion: u32,
    ) -> Result<(Model, Vec<usize>), RegistryError> {
        let table_line = table.span().map_or(0, |s| self.line_of(s.start));
        for (key, item) in table.iter() {
            if !MODEL_KEYS.contains(&key) {
                return Err(self.error(
                    item.span(),
                    format!(
                        "unknown key `{key}` (a model has {})",
                        MODEL_KEYS.join(", ")
                    ),
                ));
            }
        }
        let text = |key: &str| -> Result<Option<(String, usize)>, RegistryError> {
            match table.get(key) {
                None => Ok(None),
                Some(item) => {
                    let line = item.span().map_or(table_line, |s| self.line_of(s.start));
                    match item.as_str() {
                        Some(value) if !value.trim().is_empty() => {
                            Ok(Some((value.trim().to_owned(), line)))
                        }
                        _ => {
                            Err(self.error_at(line, format!("`{key}` must be a non-empty string")))
                        }
                    }
                }
            }
        };
        let number = |key: &str| -> Result<Option<u64>, RegistryError> {
            match table.get(key) {
                None => Ok(None),
                Some(item) => item
                    .as_integer()
                    .and_then(|n| u64::try_from(n).ok())
                    .map(Some)
                    .ok_or_else(|| {
                        self.error(item.span(), format!("`{key}` must be a whole number ≥ 0"))
                    }),
            }
        };
        let price = |key: &str| -> Result<Option<(Price, usize)>, RegistryError> {
            let Some(item) = table.get(key) else {
                return Ok(None);
            };
            let line = item.span().map_or(table_line, |s| self.line_of(s.start));
            let parsed = match item.as_value() {
                Some(Value::String(s)) => Price::parse(s.value()),
                Some(Value::Integer(n)) => Price::parse(&n.value().to_string()),
                Some(Value::Float(f)) => Price::parse(&f.value().to_string()),
                _ => None,
            };
            parsed.map(|p| Some((p, line))).ok_or_else(|| {
                self.error_at(
                    line,
                    format!(
                        "`{key}` must be a price per million tokens, such as \"0.15\" \
                         (≥ 0, at most {MAX_PRICE_SCALE} decimals)"
                    ),
                )
            })
        };

        let Some((name, line)) = text("name")? else {
            return Err(self.error_at(table_line, "a model needs a `name`".into()));
        };
        if name.chars().count() > MAX_MODEL_NAME_CHARS {
            // A reply of it could never be saved: the worker would ask the model again and again.
            return Err(self.error_at(
                line,
                format!("a model's `name` has at most {MAX_MODEL_NAME_CHARS} characters"),
            ));
        }
        let Some((base_url, url_line)) = text("base_url")? else {
            return Err(self.error_at(line, format!("model `{name}` needs a `base_url`")));
        };
        if !(base_url.starts_with("http://") || base_url.starts_with("https://")) {
            return Err(self.error_at(
                url_line,
                format!("model `{name}`: `base_url` must start with http:// or https://"),
            ));
        }
        let api_key_env = text("api_key_env")?;
        let api_key = match (&api_key_env, keys) {
            (Some((var, var_line)), Keys::Read) => {
                match lookup(var).filter(|v| !v.trim().is_empty()) {
                    Some(key) => Some(SecretString::from(key)),
                    None => {
                        return Err(self.error_at(
                            *var_line,
                            format!(
                                "model `{name}` takes its key from the environment variable \
                                 {var}, which is not set"
                            ),
                        ));
                    }
                }
            }
            _ => None,
        };
        let max_completion_tokens = match number("max_completion_tokens")? {
            None => default_completion,
            Some(n) => u32::try_from(n).ok().filter(|n| *n > 0).ok_or_else(|| {
                self.error(
                    table.get("max_completion_tokens").and_then(Item::span),
                    format!(
                        "model `{name}`: `max_completion_tokens` must be 1 to {}",
                        u32::MAX
                    ),
                )
            })?,
        };
        let context_window = number("context_window")?;
        if let Some(window) = context_window
            && window <= u64::from(max_completion_tokens)
        {
            return Err(self.error(
                table.get("context_window").and_then(Item::span),
                format!(
                    "model `{name}`: `context_window` ({window}) leaves no room for a prompt \
                     beside `max_completion_tokens` ({max_completion_tokens})"
                ),
            ));
        }
        let pricing = match (price("input_price")?, price("output_price")?) {
            (None, None) => {
                if let Some((_, l)) = text("currency")? {
                    return Err(
                        self.error_at(l, format!("model `{name}` has a `currency` but no prices"))
                    );
                }
                None
            }
            (Some((input, _)), Some((output, _))) => Some(Pricing {
                input,
                output,
                currency: match text("currency")? {
                    None => "USD".to_owned(),
                    Some((c, l)) => {
                        if c.len() != 3 || !c.bytes().all(|b| b.is_ascii_uppercase()) {
                            return Err(self.error_at(
                                l,
                                format!(
                                    "model `{name}`: `currency` must be a code such as \"USD\""
                                ),
                            ));
                        }
                        c
                    }
                },
            }),
            (Some((_, l)), None) | (None, Some((_, l))) => {
                return Err(self.error_at(
                    l,
                    format!("model `{name}` needs both `input_price` and `output_price`"),
                ));
            }
        };
        let mut fallbacks = Vec::new();
        let mut fallback_lines = Vec::new();
        if let Some(item) = table.get("fallbacks") {
            let not_list = || {
                self.error(
                    item.span(),
                    format!("model `{name}`: `fallbacks` must be a list of model names"),
                )
            };
            let list = item.as_array().ok_or_else(not_list)?;
            for value in list.iter() {
                let fallback = value.as_str().ok_or_else(not_list)?;
                let fallback_line = value.span().map_or(line, |s| self.line_of(s.start));
                if fallbacks.iter().any(|f| f == fallback) {
                    return Err(self.error_at(
                        fallback_line,
                        format!("model `{name}` lists the fallback `{fallback}` twice"),
                    ));
                }
                fallbacks.push(fallback.to_owned());
                fallback_lines.push(fallback_line);
            }
        }
        let model = Model {
            provider_model: text("provider_model")?.map_or_else(|| name.clone(), |(p, _)| p),
            base_url,
            api_key_env: api_key_env.map(|(var, _)| var),
            api_key,
            context_window,
            max_completion_tokens,
            rpm: number("rpm")?,
            tpm: number("tpm")?,
            pricing,
            fallbacks,
            line,
            name,
        };
        Ok((model, fallback_lines))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Registry, RegistryError> {
        Registry::parse(
            text,
            "models.toml",
            Keys::Read,
            |var| (var == "KEY_A").then(|| "secret-a".to_owned()),
            1024,
        )
    }

    fn error(text: &str) -> String {
        parse(text).expect_err("the file is refused").to_string()
    }

    const TWO: &str = r#"default = "m-b"

[[models]]
name = "m-a"
base_url = "http://127.0.0.1:1/v1"
api_key_env = "KEY_A"
provider_model = "gpt-4o-mini"
context_window = 8000
max_completion_tokens = 500
rpm = 60
tpm = 10000
input_price = "0.15"
output_price = 0.6
currency = "EUR"
fallbacks = ["m-b"]

[[models]]
name = "m-b"
base_url = "http://127.0.0.1:2/v1"
"#;

    #[test]
    fn a_file_gives_every_field() {
        let registry = parse(TWO).expect("parses");
        assert_eq!(registry.default_model().name, "m-b");
        let a = registry.get("m-a").expect("m-a");
        assert_eq!(a.provider_model, "gpt-4o-mini");
        assert_eq!(a.context_window, Some(8000));
        assert_eq!(a.max_completion_tokens, 500);
        assert_eq!((a.rpm, a.tpm), (Some(60), Some(10000)));
        assert_eq!(a.fallbacks, ["m-b"]);
        assert_eq!(a.line, 4);
        assert!(a.api_key.is_some());
        assert!(!format!("{a:?}").contains("secret-a"));
        let pricing = a.pricing.as_ref().expect("priced");
        assert_eq!(pricing.currency, "EUR");
        assert_eq!(pricing.input.to_string(), "0.15");
        assert_eq!(pricing.output.to_string(), "0.6");
        let b = registry.get("m-b").expect("m-b");
        assert_eq!(b.provider_model, "m-b");
        assert_eq!(b.max_completion_tokens, 1024);
        assert!(b.pricing.is_none() && b.api_key.is_none());
        assert_eq!(a.prompt_budget(3000), 3000);
        assert_eq!(a.prompt_budget(9000), 7500);
        assert_eq!(
            registry
                .chain(a)
                .iter()
                .map(|m| m.name.as_str())
                .collect::<Vec<_>>(),
            ["m-a", "m-b"]
        );
        assert!(registry.is_allowed("") && registry.is_allowed("m-a") && !registry.is_allowed("x"));
        assert_eq!(registry.resolve("gone").name, "m-b");
    }

    #[test]
    fn costs_are_exact() {
        let pricing = Pricing {
            input: Price::parse("0.15").expect("price"),
            output: Price::parse("0.6").expect("price"),
            currency: "USD".into(),
        };
        // 1,000 × 0.15 / 1e6 + 500 × 0.6 / 1e6 = 0.00015 + 0.0003
        assert_eq!(pricing.cost(1000, 500), "0.00045");
        assert_eq!(pricing.cost(0, 0), "0");
        assert_eq!(pricing.cost(2_000_000, 1_000_000), "0.9");
        let whole = Pricing {
            input: Price::parse("3").expect("price"),
            output: Price::parse("15").expect("price"),
            currency: "USD".into(),
        };
        assert_eq!(whole.cost(1_000_000, 1_000_000), "18");
        assert_eq!(whole.cost(1, 1), "0.000018");
        for bad in ["", "-1", "1.", ".5", "1e3", "0.1234567890123", "1,5", "abc"] {
            assert_eq!(Price::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn a_broken_file_is_refused_naming_the_line() {
        assert!(error("[[models]\nname = 1").contains("line 1"));
        let unknown = TWO.replace("fallbacks = [\"m-b\"]", "fallbacks = [\"m-c\"]");
        let message = error(&unknown);
        assert!(
            message.contains("line 15") && message.contains("m-c"),
            "{message}"
        );
        let cycle = format!("{TWO}fallbacks = [\"m-a\"]\n");
        let message = error(&cycle);
        assert!(
            message.contains("cycle") && message.contains("line 4"),
            "{message}"
        );
        let missing_key = TWO.replace("KEY_A", "KEY_NOT_SET");
        let message = error(&missing_key);
        assert!(
            message.contains("line 6") && message.contains("KEY_NOT_SET"),
            "{message}"
        );
        let typo = TWO.replace("rpm = 60", "rpn = 60");
        assert!(error(&typo).contains("line 10"));
        let small = TWO.replace("context_window = 8000", "context_window = 500");
        assert!(error(&small).contains("line 8"));
        let no_default = TWO.replace("default = \"m-b\"", "default = \"m-z\"");
        assert!(error(&no_default).contains("line 1"));
        let one_price = TWO.replace("output_price = 0.6\n", "");
        assert!(error(&one_price).contains("both"));
        let twice = format!("{TWO}\n[[models]]\nname = \"m-b\"\nbase_url = \"http://x/v1\"\n");
        assert!(error(&twice).contains("twice"));
        let itself = TWO.replace("fallbacks = [\"m-b\"]", "fallbacks = [\"m-a\"]");
        assert!(error(&itself).contains("itself"));
        assert!(error("default = \"x\"\n").contains("no models"));
        assert!(
            Registry::parse(&missing_key, "f", Keys::Skip, |_| None, 1024).is_ok(),
            "the API does not read keys"
        );
    }

    #[test]
    fn the_environment_is_one_endpoint() {
        let others = vec!["m-2".to_owned(), " ".to_owned(), "gpt".to_owned()];
        let registry = Registry::from_environment(EnvironmentModels {
            default: "gpt",
            others: &others,
            base_url: "http://127.0.0.1:9/v1",
            api_key: None,
            max_completion_tokens: 256,
        });
        let names: Vec<_> = registry.models().iter().map(|m| m.name.as_str()).collect();
        assert_eq!(names, ["gpt", "m-2"]);
        assert_eq!(registry.default_model().name, "gpt");
        assert!(registry.models().iter().all(|m| m.context_window.is_none()
            && m.max_completion_tokens == 256
            && m.base_url == "http://127.0.0.1:9/v1"));
    }
}
