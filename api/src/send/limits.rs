//! The limits a send must pass, in order: the user's send rate (`SEND_RATE_PER_MINUTE`,
//! [`rate`]) and their daily token budget ([`budget`]: the one staff set for them, else
//! `DAILY_TOKEN_BUDGET`). What is left of both once a send is admitted or refused is what the
//! send routes answer as headers: `RateLimit-Limit`, `RateLimit-Remaining` and
//! `RateLimit-Reset` (seconds until the rate's window ends) for the send rate, and
//! `X-Budget-Remaining` for the day's tokens; each is left out where there is no limit.
use aichat_shared::budget::Reservation;
use axum::http::{HeaderMap, HeaderName, HeaderValue};

use crate::error::{ApiError, ApiResult};
use crate::send::budget::{self, Reserve};
use crate::send::rate;
use crate::state::AppState;

const RATE_LIMIT: HeaderName = HeaderName::from_static("ratelimit-limit");
const RATE_REMAINING: HeaderName = HeaderName::from_static("ratelimit-remaining");
const RATE_RESET: HeaderName = HeaderName::from_static("ratelimit-reset");
const BUDGET_REMAINING: HeaderName = HeaderName::from_static("x-budget-remaining");

/// Whose send it is, as the limits see them: the user, and the daily token budget staff set
/// for them as their session was read (`None`: the deployment's default).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sender {
    pub user_id: i64,
    pub daily_token_budget: Option<i64>,
}

impl Sender {
    /// The user's daily token limit; `None`: no limit.
    pub fn daily_limit(&self, state: &AppState) -> Option<i64> {
        aichat_shared::budget::daily_limit(
            self.daily_token_budget,
            state.settings.daily_token_budget,
        )
    }
}

/// Where a user stands in the send rate's current window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLeft {
    pub limit: u64,
    pub remaining: u64,
    /// Seconds until the window ends and the count starts again (at least 1).
    pub reset_secs: u64,
}

/// What is left of a user's limits after a send was admitted or refused: the response headers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LimitsLeft {
    /// `None`: no send rate.
    pub rate: Option<RateLeft>,
    /// Tokens left today; `None`: no daily limit (or it could not be read).
    pub budget: Option<i64>,
}

impl LimitsLeft {
    /// Writes the headers of the limits there are.
    pub fn write(&self, headers: &mut HeaderMap) {
        if let Some(rate) = self.rate {
            headers.insert(RATE_LIMIT, HeaderValue::from(rate.limit));
            headers.insert(RATE_REMAINING, HeaderValue::from(rate.remaining));
            headers.insert(RATE_RESET, HeaderValue::from(rate.reset_secs));
        }
        if let Some(budget) = self.budget {
            headers.insert(BUDGET_REMAINING, HeaderValue::from(budget));
        }
    }
}

/// A send that passed the limits: its reservation of the budget (none without a limit), and
/// what is left.
#[derive(Debug)]
pub struct Admitted {
    pub reservation: Option<Reservation>,
    pub left: LimitsLeft,
}

/// Counts a send against the user's send rate, then reserves the most it can cost of their
/// day's budget. 429 past either, with what is left (a refusal of the rate reserves nothing).
pub async fn admit(state: &AppState, sender: Sender) -> ApiResult<Admitted> {
    let rate = match rate::count(state, sender.user_id).await? {
        Some(counted) if !counted.admitted => {
            // The refusal says what is left of the budget too, which only a read can tell.
            let budget = budget::remaining(state, sender).await;
            return Err(ApiError::TooManyRequests {
                retry_after_secs: counted.left.reset_secs,
                left: LimitsLeft {
                    rate: Some(counted.left),
                    budget,
                },
            });
        }
        counted => counted.map(|counted| counted.left),
    };
    match budget::reserve(state, sender).await? {
        Reserve::Unlimited => Ok(Admitted {
            reservation: None,
            left: LimitsLeft { rate, budget: None },
        }),
        Reserve::Admitted {
            reservation,
            remaining,
        } => Ok(Admitted {
            reservation: Some(reservation),
            left: LimitsLeft {
                rate,
                budget: Some(remaining),
            },
        }),
        Reserve::Refused {
            remaining,
            retry_after_secs,
        } => Err(ApiError::BudgetExceeded {
            retry_after_secs,
            left: LimitsLeft {
                rate,
                budget: Some(remaining),
            },
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_limits_there_are_become_headers() {
        let mut headers = HeaderMap::new();
        LimitsLeft::default().write(&mut headers);
        assert!(headers.is_empty());
        LimitsLeft {
            rate: Some(RateLeft {
                limit: 60,
                remaining: 59,
                reset_secs: 60,
            }),
            budget: Some(0),
        }
        .write(&mut headers);
        let value = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        assert_eq!(value("RateLimit-Limit"), Some("60"));
        assert_eq!(value("RateLimit-Remaining"), Some("59"));
        assert_eq!(value("RateLimit-Reset"), Some("60"));
        assert_eq!(value("X-Budget-Remaining"), Some("0"));
    }
}
