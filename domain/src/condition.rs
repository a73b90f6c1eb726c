//! The condition language of segments, lifecycle stages and `previewSegment` (shared contract
//! `segment-conditions.md`): a typed syntax tree parsed from JSON, what a condition depends on, and
//! its evaluation for one profile in memory.
//!
//! Guarantees: [`parse`] accepts exactly the shapes of the contract and names the first offending
//! node otherwise; a parsed condition is at most [`MAX_DEPTH`] levels deep and has at most
//! [`MAX_NODES`] nodes; [`Condition::to_json`] gives back JSON that parses to an equal condition;
//! [`Condition::evaluate`] is a total, deterministic function of the condition, the profile's facts
//! and `now`.
//!
//! # Evaluation rules
//!
//! These rules are the contract between [`Condition::evaluate`] (one profile, in memory) and the
//! SQL that the store builds from a condition (all profiles at once): both must give the same
//! answer for every parsed condition.
//!
//! 1. **Logic.** `all` holds when every child holds, so `{"all": []}` holds; `any` holds when at
//!    least one child holds, so `{"any": []}` does not; `not` holds when its child does not. Every
//!    leaf is true or false, never unknown: SQL must turn a NULL produced by a leaf into FALSE
//!    before `NOT` sees it.
//! 2. **Paths.** A trait path `a.b.c` looks up key `a` in the traits object, then key `b` in that
//!    value, then `c`. Only objects are navigated: a step into an array, a string or any other
//!    non-object finds nothing (`items.0` never indexes an array). Keys match exactly, and a key
//!    that contains a dot cannot be named. A `where` property path works the same way on an
//!    event's properties.
//! 3. **Missing values.** When the path finds nothing, `exists` is false, `not_exists` is true and
//!    every other operator is false, `neq` included: a value that is not there is not "different"
//!    from anything. A JSON `null` that is present counts as absent for `exists` (false) and
//!    `not_exists` (true), but it is a value for the other operators: `eq null` holds for it.
//! 4. **Kinds and equality.** A value is a null, a boolean, a number, a string, an array or an
//!    object. `eq` holds when the value and the operand are scalars (null, boolean, number, string)
//!    of the same kind and are equal; `neq` holds when they are scalars of the same kind and
//!    differ. Values of different kinds are neither equal nor unequal: a number and a string never
//!    compare (`"1"` is neither `eq` nor `neq` to `1`), `neq null` never holds, and an array or
//!    object value satisfies neither `eq` nor `neq`. Strings are equal when their bytes are equal
//!    (case-sensitive, no Unicode normalization), also when both are instants: `eq` compares the
//!    text, so `"2026-01-01T00:00:00Z"` is not `eq` to `"2026-01-01T01:00:00+01:00"`.
//! 5. **Numbers** compare as IEEE 754 double-precision values, so `1` equals `1.0`. The SQL side
//!    casts both sides to double precision (`REAL` in SQLite).
//! 6. **Order** (`gt`, `gte`, `lt`, `lte`). The operand is a number, an instant string (rule 7) or
//!    `{"ago": D}`. With a number operand the comparison holds only when the value is a number,
//!    compared as in rule 5. With an instant operand or `ago`, it holds only when the value is a
//!    string that is an instant, compared as instants. Anything else never holds: strings that are
//!    not instants have no order (there is no lexicographic comparison), and a numeric string such
//!    as `"42"` is not a number.
//! 7. **Instants.** A string is an instant when it matches
//!    `^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{1,6})?(Z|[+-][0-9]{2}:[0-9]{2})$`
//!    (upper-case `T` and `Z` only, at most six fractional digits) and names a real time: year
//!    0001 to 9999, month 01 to 12, a day that exists in that month of the proleptic Gregorian
//!    calendar, hour 00 to 23, minute and second 00 to 59 (no leap second), offset hours 00 to 23
//!    and offset minutes 00 to 59. Instants compare as points in time (the offset is applied) at
//!    microsecond precision. `{"ago": D}` is the instant `now - D`, where `now` is first truncated
//!    to whole microseconds.
//! 8. **`contains`.** A string value contains a string operand when the operand is a substring of
//!    it (byte-wise, case-sensitive; the empty string is in every string). An array value contains
//!    the operand when at least one element is `eq` to it (rule 4). Anything else is false, for
//!    example a number operand against a string value.
//! 9. **`starts_with`** holds for a string value that begins with the operand (byte-wise,
//!    case-sensitive); anything else is false.
//! 10. **`in`** holds when the value is `eq` to at least one element of the operand list (rule 4).
//!     An array or object value is never `in` a list, because the elements are scalars.
//! 11. **Attributes.** An attribute's value is `ProfileFacts::attributes[name]`, with two
//!     exceptions: `stage` is `ProfileFacts::stage` (a string, or missing), and
//!     `days_since_last_seen` is derived as `floor((now - last_seen_at) / 24 hours)`, the whole
//!     number of days since the `last_seen_at` attribute (an instant, rule 7) at microsecond
//!     precision, negative when `last_seen_at` lies in the future, and missing when `last_seen_at`
//!     is missing or not an instant. Entries of the map for these two are ignored. Rules 3 to 10
//!     then apply as for traits.
//! 12. **Events.** An `event` condition counts the profile's events whose name equals NAME exactly
//!     (any name for `$any`), whose timestamp, truncated to whole microseconds, lies in
//!     `[now - within, now]` (both ends included) when `within` is given (without `within` there
//!     is no bound at all, and events stamped in the future count too), and whose properties
//!     satisfy every `where` predicate (rules 2 to 10 applied to the properties object). The
//!     condition holds when that count satisfies `count` (default `{"gte": 1}`); so
//!     `"count": {"eq": 0}` holds for a profile that has no such event.
//! 13. **Stage and consent.** `{"stage": KEY}` holds when the profile's stage equals KEY exactly.
//!     `{"consent": PURPOSE}` holds when the consent for PURPOSE is recorded as granted (`true`); a
//!     withdrawn or missing consent does not hold.

use std::borrow::Cow;
use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use chrono::{DateTime, Duration, SubsecRound, Utc};
use serde_json::{Map, Value};

/// The deepest nesting accepted: the root condition is level 1, a child of `all`, `any` or `not`
/// is one level below its parent.
pub const MAX_DEPTH: usize = 16;

/// The most nodes accepted: every condition counts one, and so does every `where` predicate.
pub const MAX_NODES: usize = 256;

/// The most segments of a trait or property path.
pub const MAX_PATH_SEGMENTS: usize = 16;

/// The event name that stands for every event.
pub const ANY_EVENT: &str = "$any";

/// The longest duration accepted: 100 Julian years of 365.25 days.
pub const MAX_DURATION_SECONDS: i64 = 36_525 * SECONDS_PER_DAY;

const SECONDS_PER_DAY: i64 = 86_400;
const MICROSECONDS_PER_DAY: i64 = SECONDS_PER_DAY * 1_000_000;

/// The name of the root in error paths.
const ROOT: &str = "condition";

const SHAPES: [&str; 8] = [
    "all",
    "any",
    "not",
    "trait",
    "attribute",
    "event",
    "stage",
    "consent",
];

/// Why a condition was refused: `path` names the first offending node, relative to the condition
/// root, which is called `condition` (for example `condition.all[1].op`); `reason` says what was
/// expected there.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {reason}")]
pub struct ConditionError {
    pub path: String,
    pub reason: String,
}

fn error(path: &str, reason: impl Into<String>) -> ConditionError {
    ConditionError {
        path: path.to_owned(),
        reason: reason.into(),
    }
}

/// A comparison operator of a trait, attribute or property predicate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Op {
    Eq,
    Neq,
    Gt,
    Gte,
    Lt,
    Lte,
    Contains,
    StartsWith,
    In,
    Exists,
    NotExists,
}

impl Op {
    pub const ALL: [Op; 11] = [
        Op::Eq,
        Op::Neq,
        Op::Gt,
        Op::Gte,
        Op::Lt,
        Op::Lte,
        Op::Contains,
        Op::StartsWith,
        Op::In,
        Op::Exists,
        Op::NotExists,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Op::Eq => "eq",
            Op::Neq => "neq",
            Op::Gt => "gt",
            Op::Gte => "gte",
            Op::Lt => "lt",
            Op::Lte => "lte",
            Op::Contains => "contains",
            Op::StartsWith => "starts_with",
            Op::In => "in",
            Op::Exists => "exists",
            Op::NotExists => "not_exists",
        }
    }

    /// The operator spelled `text` exactly, if any.
    pub fn parse(text: &str) -> Option<Op> {
        Op::ALL.into_iter().find(|op| op.as_str() == text)
    }

    /// False for `exists` and `not_exists`, which take no value.
    pub fn takes_value(self) -> bool {
        !matches!(self, Op::Exists | Op::NotExists)
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A built-in or computed attribute of a profile.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Attribute {
    /// The instant of the profile's first message (an RFC 3339 string).
    FirstSeenAt,
    /// The instant of the profile's latest message (an RFC 3339 string).
    LastSeenAt,
    /// How many events the profile has.
    EventCount,
    /// The lifecycle stage key, read from `ProfileFacts::stage`.
    Stage,
    /// Whole days since `last_seen_at`, derived from it and `now` (rule 11 of the module docs).
    DaysSinceLastSeen,
    RfmRecency,
    RfmFrequency,
    RfmMonetary,
    RfmScore,
    ChurnRisk,
    TotalRevenue,
    OrderCount,
}

impl Attribute {
    pub const ALL: [Attribute; 12] = [
        Attribute::FirstSeenAt,
        Attribute::LastSeenAt,
        Attribute::EventCount,
        Attribute::Stage,
        Attribute::DaysSinceLastSeen,
        Attribute::RfmRecency,
        Attribute::RfmFrequency,
        Attribute::RfmMonetary,
        Attribute::RfmScore,
        Attribute::ChurnRisk,
        Attribute::TotalRevenue,
        Attribute::OrderCount,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Attribute::FirstSeenAt => "first_seen_at",
            Attribute::LastSeenAt => "last_seen_at",
            Attribute::EventCount => "event_count",
            Attribute::Stage => "stage",
            Attribute::DaysSinceLastSeen => "days_since_last_seen",
            Attribute::RfmRecency => "rfm_recency",
            Attribute::RfmFrequency => "rfm_frequency",
            Attribute::RfmMonetary => "rfm_monetary",
            Attribute::RfmScore => "rfm_score",
            Attribute::ChurnRisk => "churn_risk",
            Attribute::TotalRevenue => "total_revenue",
            Attribute::OrderCount => "order_count",
        }
    }

    /// The attribute spelled `text` exactly, if any.
    pub fn parse(text: &str) -> Option<Attribute> {
        Attribute::ALL
            .into_iter()
            .find(|attribute| attribute.as_str() == text)
    }
}

impl fmt::Display for Attribute {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a duration was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    #[error(
        "expected a duration such as \"30d\", \"12h\", \"15m\", \"90s\", or ISO 8601 such as \
         \"P30D\", \"PT12H\", \"P1DT2H\", \"P2W\""
    )]
    Malformed,
    #[error("years and months have no fixed length; write days instead, for example \"P30D\"")]
    CalendarUnit,
    #[error("fractions are not supported; use a smaller unit, for example \"PT90M\"")]
    Fraction,
    #[error("a duration must be longer than zero")]
    NotPositive,
    #[error("a duration must be at most 100 years (36525 days)")]
    TooLong,
}

/// A length of time written in a condition: the `within` window of an event condition and the
/// `D` of `{"ago": D}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Window {
    // Invariant: a whole number of seconds, at least 1 and at most MAX_DURATION_SECONDS.
    seconds: i64,
}

impl Window {
    /// Parses `"30d"`, `"12h"`, `"15m"`, `"90s"` (digits and one lower-case unit) or an ISO 8601
    /// duration of weeks, days, hours, minutes and seconds with whole numbers (`"P30D"`,
    /// `"PT12H"`, `"P1DT2H"`, `"PT90S"`, `"P2W"`). Years and months are refused because they
    /// have no fixed length; so are zero, negative and fractional durations, and durations longer
    /// than 100 years.
    pub fn parse(text: &str) -> Result<Window, DurationError> {
        if let Some(magnitude) = text.strip_prefix('-') {
            return match Window::parse(magnitude) {
                Ok(_) => Err(DurationError::NotPositive),
                Err(error) => Err(error),
            };
        }
        let seconds = match text.strip_prefix('P') {
            Some(iso) => parse_iso_duration(iso)?,
            None => parse_short_duration(text)?,
        };
        Window::from_seconds(seconds)
    }

    /// A window of `duration`, which must be a whole number of seconds between one second and 100
    /// years.
    pub fn from_duration(duration: Duration) -> Result<Window, DurationError> {
        if duration.subsec_nanos() != 0 {
            return Err(DurationError::Fraction);
        }
        Window::from_seconds(duration.num_seconds())
    }

    fn from_seconds(seconds: i64) -> Result<Window, DurationError> {
        if seconds <= 0 {
            Err(DurationError::NotPositive)
        } else if seconds > MAX_DURATION_SECONDS {
            Err(DurationError::TooLong)
        } else {
            Ok(Window { seconds })
        }
    }

    pub fn duration(self) -> Duration {
        Duration::seconds(self.seconds)
    }

    pub fn num_seconds(self) -> i64 {
        self.seconds
    }

    /// The canonical text: the largest of days, hours, minutes and seconds that divides the
    /// duration exactly (`"30d"`, `"36h"`, `"90s"`).
    pub fn to_text(self) -> String {
        let seconds = self.seconds;
        if seconds % SECONDS_PER_DAY == 0 {
            format!("{}d", seconds / SECONDS_PER_DAY)
        } else if seconds % 3600 == 0 {
            format!("{}h", seconds / 3600)
        } else if seconds % 60 == 0 {
            format!("{}m", seconds / 60)
        } else {
            format!("{seconds}s")
        }
    }

    /// `now - self`, or the earliest representable instant when that lies before it.
    fn before(self, now: DateTime<Utc>) -> DateTime<Utc> {
        now.checked_sub_signed(self.duration())
            .unwrap_or(DateTime::<Utc>::MIN_UTC)
    }
}

impl fmt::Display for Window {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_text())
    }
}

fn parse_short_duration(text: &str) -> Result<i64, DurationError> {
    let digits = text.bytes().take_while(u8::is_ascii_digit).count();
    let (amount, unit) = text.split_at(digits);
    let unit_seconds = match unit {
        "d" => SECONDS_PER_DAY,
        "h" => 3600,
        "m" => 60,
        "s" => 1,
        _ if unit.starts_with(['.', ',']) && digits > 0 => return Err(DurationError::Fraction),
        _ => return Err(DurationError::Malformed),
    };
    if amount.is_empty() {
        return Err(DurationError::Malformed);
    }
    // Only ASCII digits remain, so parsing fails only on overflow: far more than 100 years.
    let amount: i64 = amount.parse().map_err(|_| DurationError::TooLong)?;
    amount
        .checked_mul(unit_seconds)
        .ok_or(DurationError::TooLong)
}

/// Parses what follows the `P` of an ISO 8601 duration.
fn parse_iso_duration(text: &str) -> Result<i64, DurationError> {
    let (date_part, time_part) = match text.split_once('T') {
        Some((date_part, time_part)) => (date_part, Some(time_part)),
        None => (text, None),
    };
    let mut total = 0i64;
    let mut components = 0usize;
    // A unit of `None` seconds is a calendar unit (years, months), which has no fixed length.
    let date_units = [
        ('Y', None),
        ('M', None),
        ('W', Some(7 * SECONDS_PER_DAY)),
        ('D', Some(SECONDS_PER_DAY)),
    ];
    components += add_iso_components(date_part, &date_units, &mut total)?;
    if let Some(time_part) = time_part {
        let time_units = [('H', Some(3600)), ('M', Some(60)), ('S', Some(1))];
        let time_components = add_iso_components(time_part, &time_units, &mut total)?;
        if time_components == 0 {
            return Err(DurationError::Malformed);
        }
        components += time_components;
    }
    if components == 0 {
        return Err(DurationError::Malformed);
    }
    Ok(total)
}

/// Adds the components of one part of an ISO 8601 duration (`1W2D` or `3H4M5S`) to `total`;
/// designators must follow the order of `units`. Returns how many components there were.
fn add_iso_components(
    text: &str,
    units: &[(char, Option<i64>)],
    total: &mut i64,
) -> Result<usize, DurationError> {
    let mut rest = text;
    let mut next_unit = 0;
    let mut components = 0;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(DurationError::Malformed);
        }
        let (amount, after) = rest.split_at(digits);
        let mut chars = after.chars();
        let designator = chars.next().ok_or(DurationError::Malformed)?;
        if designator == '.' || designator == ',' {
            return Err(DurationError::Fraction);
        }
        let position = units
            .get(next_unit..)
            .and_then(|remaining| remaining.iter().position(|(unit, _)| *unit == designator))
            .ok_or(DurationError::Malformed)?;
        let (_, unit_seconds) = units[next_unit + position];
        next_unit += position + 1;
        let unit_seconds = unit_seconds.ok_or(DurationError::CalendarUnit)?;
        // Only ASCII digits, so parsing fails only on overflow: far more than 100 years.
        let amount: i64 = amount.parse().map_err(|_| DurationError::TooLong)?;
        *total = amount
            .checked_mul(unit_seconds)
            .and_then(|seconds| total.checked_add(seconds))
            .ok_or(DurationError::TooLong)?;
        components += 1;
        rest = chars.as_str();
    }
    Ok(components)
}

/// Parses an instant as the condition language understands it (rule 7 of the module docs): strict
/// RFC 3339 with upper-case `T` and `Z`, at most six fractional digits, years 0001 to 9999 and no
/// leap second.
pub fn parse_instant(text: &str) -> Option<DateTime<Utc>> {
    let bytes = text.as_bytes();
    let digit = |index: usize| bytes.get(index).is_some_and(u8::is_ascii_digit);
    let byte_is = |index: usize, expected: u8| bytes.get(index) == Some(&expected);
    let fixed_part = (0..4).all(digit)
        && byte_is(4, b'-')
        && digit(5)
        && digit(6)
        && byte_is(7, b'-')
        && digit(8)
        && digit(9)
        && byte_is(10, b'T')
        && digit(11)
        && digit(12)
        && byte_is(13, b':')
        && digit(14)
        && digit(15)
        && byte_is(16, b':')
        && digit(17)
        && digit(18);
    if !fixed_part || text.starts_with("0000") || bytes[17] > b'5' {
        return None;
    }
    // The first 19 bytes are ASCII, so 19 is a character boundary.
    let mut zone = &text[19..];
    if let Some(fraction) = zone.strip_prefix('.') {
        let digits = fraction.bytes().take_while(u8::is_ascii_digit).count();
        if !(1..=6).contains(&digits) {
            return None;
        }
        zone = &fraction[digits..];
    }
    let zone_bytes = zone.as_bytes();
    let zone_ok = zone == "Z"
        || (zone_bytes.len() == 6
            && matches!(zone_bytes[0], b'+' | b'-')
            && zone_bytes[1..3].iter().all(u8::is_ascii_digit)
            && zone_bytes[3] == b':'
            && zone_bytes[4..6].iter().all(u8::is_ascii_digit)
            && &zone[1..3] <= "23"
            && &zone[4..6] <= "59");
    if !zone_ok {
        return None;
    }
    DateTime::parse_from_rfc3339(text)
        .ok()
        .map(|instant| instant.with_timezone(&Utc))
}

/// The right-hand side of a comparison.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Operand {
    /// No value: the operand of `exists` and `not_exists`.
    Absent,
    /// A JSON value: a scalar for `eq`, `neq` and `contains`, a string for `starts_with`, an array
    /// of scalars for `in`, a number or an instant string for `gt`, `gte`, `lt` and `lte`.
    Value(Value),
    /// `{"ago": D}`: the instant `now - D`, for `gt`, `gte`, `lt` and `lte`.
    Ago(Window),
}

/// A `where` predicate of an event condition, on the event's properties.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PropertyPredicate {
    /// The dot path into the properties, one segment per key.
    pub path: Vec<String>,
    pub op: Op,
    pub value: Operand,
}

/// The event name of an event condition.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum EventName {
    Named(String),
    /// `"$any"`: every event.
    Any,
}

/// An operator of an event count.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum CountOp {
    Eq,
    Neq,
    Gt,
    Gte,
    Lt,
    Lte,
}

impl CountOp {
    pub const ALL: [CountOp; 6] = [
        CountOp::Eq,
        CountOp::Neq,
        CountOp::Gt,
        CountOp::Gte,
        CountOp::Lt,
        CountOp::Lte,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            CountOp::Eq => "eq",
            CountOp::Neq => "neq",
            CountOp::Gt => "gt",
            CountOp::Gte => "gte",
            CountOp::Lt => "lt",
            CountOp::Lte => "lte",
        }
    }

    pub fn parse(text: &str) -> Option<CountOp> {
        CountOp::ALL.into_iter().find(|op| op.as_str() == text)
    }
}

/// How many matching events an event condition needs, for example `{"gte": 2}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CountComparison {
    pub op: CountOp,
    pub n: u32,
}

impl Default for CountComparison {
    /// `{"gte": 1}`: at least one matching event.
    fn default() -> Self {
        CountComparison {
            op: CountOp::Gte,
            n: 1,
        }
    }
}

impl CountComparison {
    /// Whether `count` satisfies this comparison.
    pub fn holds(&self, count: u64) -> bool {
        let n = u64::from(self.n);
        match self.op {
            CountOp::Eq => count == n,
            CountOp::Neq => count != n,
            CountOp::Gt => count > n,
            CountOp::Gte => count >= n,
            CountOp::Lt => count < n,
            CountOp::Lte => count <= n,
        }
    }
}

/// A parsed condition. Build one with [`parse`]; a condition built by hand with an operand its
/// operator does not take (which `parse` refuses) simply never holds for that leaf.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Condition {
    All(Vec<Condition>),
    Any(Vec<Condition>),
    Not(Box<Condition>),
    Trait {
        /// The dot path into the merged traits, one segment per key.
        path: Vec<String>,
        op: Op,
        value: Operand,
    },
    Attribute {
        name: Attribute,
        op: Op,
        value: Operand,
    },
    Event {
        name: EventName,
        filters: Vec<PropertyPredicate>,
        count: CountComparison,
        /// None means all time.
        within: Option<Window>,
    },
    Stage(String),
    Consent(String),
}

/// Parses a condition from its JSON form, the shapes of the shared contract
/// `segment-conditions.md`.
///
/// Refuses, naming the first offending node by its path from the root `condition`: a node that is
/// no known shape, unknown keys, an operator that does not take the given value (`in` needs an
/// array of scalars, `exists` and `not_exists` take no `value`, `starts_with` needs a string,
/// `contains`, `eq` and `neq` need a scalar, `gt`, `gte`, `lt` and `lte` need a number, an instant
/// or `{"ago": D}`), bad durations, counts that are not one operator with a non-negative integer,
/// empty names and paths, nesting deeper than [`MAX_DEPTH`] levels and more than [`MAX_NODES`]
/// nodes. Nodes are checked in document order, depth-first, so the error is always about the
/// first bad node.
pub fn parse(value: &Value) -> Result<Condition, ConditionError> {
    Parser { nodes: 0 }.condition(value, ROOT, 1)
}

struct Parser {
    nodes: usize,
}

fn child(path: &str, key: &str) -> String {
    format!("{path}.{key}")
}

fn indexed(path: &str, index: usize) -> String {
    format!("{path}[{index}]")
}

fn list_of(names: &[&str]) -> String {
    names.join(", ")
}

fn op_names() -> String {
    Op::ALL.map(Op::as_str).join(", ")
}

/// Refuses every key of `object` that is not in `allowed`.
fn only_keys(
    object: &Map<String, Value>,
    path: &str,
    allowed: &[&str],
    shape: &str,
) -> Result<(), ConditionError> {
    match object.keys().find(|key| !allowed.contains(&key.as_str())) {
        Some(key) => Err(error(
            &child(path, key),
            format!(
                "unknown key; {shape} has only the keys {}",
                list_of(allowed)
            ),
        )),
        None => Ok(()),
    }
}

fn is_scalar(value: &Value) -> bool {
    !matches!(value, Value::Array(_) | Value::Object(_))
}

/// A non-empty string at `object[key]`.
fn name_field(
    object: &Map<String, Value>,
    path: &str,
    key: &str,
    what: &str,
) -> Result<String, ConditionError> {
    match object.get(key) {
        Some(Value::String(text)) if !text.is_empty() => Ok(text.clone()),
        _ => Err(error(
            &child(path, key),
            format!("expected {what} (a non-empty string)"),
        )),
    }
}

/// A dot path at `object[key]`: non-empty segments separated by dots.
fn dot_path(
    object: &Map<String, Value>,
    path: &str,
    key: &str,
) -> Result<Vec<String>, ConditionError> {
    let path = child(path, key);
    let expected = format!(
        "expected a dot path such as \"address.city\": at most {MAX_PATH_SEGMENTS} non-empty \
         keys separated by dots"
    );
    let Some(Value::String(text)) = object.get(key) else {
        return Err(error(&path, expected));
    };
    let segments: Vec<String> = text.split('.').map(str::to_owned).collect();
    if segments.iter().any(String::is_empty) || segments.len() > MAX_PATH_SEGMENTS {
        return Err(error(&path, expected));
    }
    Ok(segments)
}

impl Parser {
    fn count_node(&mut self, path: &str) -> Result<(), ConditionError> {
        self.nodes += 1;
        if self.nodes > MAX_NODES {
            return Err(error(
                path,
                format!("the condition has more than {MAX_NODES} nodes; the limit is {MAX_NODES}"),
            ));
        }
        Ok(())
    }

    fn condition(
        &mut self,
        value: &Value,
        path: &str,
        level: usize,
    ) -> Result<Condition, ConditionError> {
        // Checked before looking inside, so that recursion never goes deeper than the limit.
        if level > MAX_DEPTH {
            return Err(error(
                path,
                format!(
                    "the condition is nested deeper than {MAX_DEPTH} levels; the limit is \
                     {MAX_DEPTH}"
                ),
            ));
        }
        self.count_node(path)?;
        let expected = format!(
            "expected a condition: an object with one of the keys {}",
            list_of(&SHAPES)
        );
        let Value::Object(object) = value else {
            return Err(error(path, expected));
        };
        let Some(shape) = SHAPES.into_iter().find(|shape| object.contains_key(*shape)) else {
            let found: Vec<&str> = object.keys().map(String::as_str).collect();
            let found = if found.is_empty() {
                "an empty object".to_owned()
            } else {
                format!("the keys {}", list_of(&found))
            };
            return Err(error(path, format!("{expected}; found {found}")));
        };
        match shape {
            "all" | "any" => {
                only_keys(object, path, &[shape], &format!("an {shape} condition"))?;
                let list_path = child(path, shape);
                let Some(Value::Array(items)) = object.get(shape) else {
                    return Err(error(&list_path, "expected an array of conditions"));
                };
                let children = items
                    .iter()
                    .enumerate()
                    .map(|(index, item)| {
                        self.condition(item, &indexed(&list_path, index), level + 1)
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(if shape == "all" {
                    Condition::All(children)
                } else {
                    Condition::Any(children)
                })
            }
            "not" => {
                only_keys(object, path, &["not"], "a not condition")?;
                let inner = object.get("not").unwrap_or(&Value::Null);
                let inner = self.condition(inner, &child(path, "not"), level + 1)?;
                Ok(Condition::Not(Box::new(inner)))
            }
            "trait" => {
                only_keys(object, path, &["trait", "op", "value"], "a trait condition")?;
                let trait_path = dot_path(object, path, "trait")?;
                let (op, value) = comparison(object, path)?;
                Ok(Condition::Trait {
                    path: trait_path,
                    op,
                    value,
                })
            }
            "attribute" => {
                only_keys(
                    object,
                    path,
                    &["attribute", "op", "value"],
                    "an attribute condition",
                )?;
                let name = match object.get("attribute") {
                    Some(Value::String(text)) => Attribute::parse(text),
                    _ => None,
                }
                .ok_or_else(|| {
                    error(
                        &child(path, "attribute"),
                        format!(
                            "expected an attribute name, one of {}",
                            Attribute::ALL.map(Attribute::as_str).join(", ")
                        ),
                    )
                })?;
                let (op, value) = comparison(object, path)?;
                Ok(Condition::Attribute { name, op, value })
            }
            "event" => self.event(object, path),
            "stage" => {
                only_keys(object, path, &["stage"], "a stage condition")?;
                Ok(Condition::Stage(name_field(
                    object,
                    path,
                    "stage",
                    "a lifecycle stage key",
                )?))
            }
            _ => {
                only_keys(object, path, &["consent"], "a consent condition")?;
                Ok(Condition::Consent(name_field(
                    object,
                    path,
                    "consent",
                    "a consent purpose",
                )?))
            }
        }
    }

    fn event(
        &mut self,
        object: &Map<String, Value>,
        path: &str,
    ) -> Result<Condition, ConditionError> {
        only_keys(
            object,
            path,
            &["event", "where", "count", "within"],
            "an event condition",
        )?;
        let name = name_field(
            object,
            path,
            "event",
            "an event name, or \"$any\" for any event",
        )?;
        let name = if name == ANY_EVENT {
            EventName::Any
        } else {
            EventName::Named(name)
        };
        let mut filters = Vec::new();
        if let Some(predicates) = object.get("where") {
            let where_path = child(path, "where");
            let Value::Array(predicates) = predicates else {
                return Err(error(
                    &where_path,
                    "expected an array of property predicates {\"property\": PATH, \"op\": OP, \
                     \"value\": V}",
                ));
            };
            for (index, predicate) in predicates.iter().enumerate() {
                let predicate_path = indexed(&where_path, index);
                self.count_node(&predicate_path)?;
                let Value::Object(predicate) = predicate else {
                    return Err(error(
                        &predicate_path,
                        "expected a property predicate {\"property\": PATH, \"op\": OP, \
                         \"value\": V}",
                    ));
                };
                only_keys(
                    predicate,
                    &predicate_path,
                    &["property", "op", "value"],
                    "a property predicate",
                )?;
                let property_path = dot_path(predicate, &predicate_path, "property")?;
                let (op, value) = comparison(predicate, &predicate_path)?;
                filters.push(PropertyPredicate {
                    path: property_path,
                    op,
                    value,
                });
            }
        }
        let count = match object.get("count") {
            None => CountComparison::default(),
            Some(count) => count_comparison(count, &child(path, "count"))?,
        };
        let within = match object.get("within") {
            None => None,
            Some(within) => Some(duration(within, &child(path, "within"))?),
        };
        Ok(Condition::Event {
            name,
            filters,
            count,
            within,
        })
    }
}

fn count_comparison(value: &Value, path: &str) -> Result<CountComparison, ConditionError> {
    let op_names = CountOp::ALL.map(CountOp::as_str).join(", ");
    let expected = format!(
        "expected an object with exactly one of {op_names} and a non-negative integer, for \
         example {{\"gte\": 2}}"
    );
    let Value::Object(object) = value else {
        return Err(error(path, expected));
    };
    let mut entries = object.iter();
    let (Some((key, n)), None) = (entries.next(), entries.next()) else {
        return Err(error(path, expected));
    };
    let op_path = child(path, key);
    let op = CountOp::parse(key).ok_or_else(|| {
        error(
            &op_path,
            format!("unknown count operator; expected one of {op_names}"),
        )
    })?;
    let n = n
        .as_u64()
        .and_then(|n| u32::try_from(n).ok())
        .ok_or_else(|| {
            error(
                &op_path,
                format!("expected a non-negative integer of at most {}", u32::MAX),
            )
        })?;
    Ok(CountComparison { op, n })
}

fn duration(value: &Value, path: &str) -> Result<Window, ConditionError> {
    match value {
        Value::String(text) => {
            Window::parse(text).map_err(|reason| error(path, reason.to_string()))
        }
        _ => Err(error(path, DurationError::Malformed.to_string())),
    }
}

/// The `op` and `value` of a trait, attribute or property node.
fn comparison(object: &Map<String, Value>, path: &str) -> Result<(Op, Operand), ConditionError> {
    let op_path = child(path, "op");
    let op = match object.get("op") {
        Some(Value::String(text)) => Op::parse(text),
        _ => None,
    }
    .ok_or_else(|| {
        error(
            &op_path,
            format!("expected an operator, one of {}", op_names()),
        )
    })?;
    let value_path = child(path, "value");
    let operand = operand(op, object.get("value"), &value_path)?;
    Ok((op, operand))
}

fn operand(op: Op, value: Option<&Value>, path: &str) -> Result<Operand, ConditionError> {
    const ORDER: &str = "a number, an RFC 3339 instant such as \"2026-01-31T00:00:00Z\", or \
                         {\"ago\": DURATION}";
    let expected = match op {
        Op::Exists | Op::NotExists => "no value",
        Op::Eq | Op::Neq | Op::Contains => "a scalar value (a string, number, boolean or null)",
        Op::StartsWith => "a string value",
        Op::In => "an array of scalar values (strings, numbers, booleans or null)",
        Op::Gt | Op::Gte | Op::Lt | Op::Lte => ORDER,
    };
    let value = match (op.takes_value(), value) {
        (false, None) => return Ok(Operand::Absent),
        (false, Some(_)) => return Err(error(path, format!("{op} takes no value"))),
        (true, None) => return Err(error(path, format!("{op} needs {expected}"))),
        (true, Some(value)) => value,
    };
    let refuse = || error(path, format!("{op} needs {expected}"));
    match op {
        Op::Eq | Op::Neq | Op::Contains if is_scalar(value) => Ok(Operand::Value(value.clone())),
        Op::StartsWith if value.is_string() => Ok(Operand::Value(value.clone())),
        Op::In => {
            let Value::Array(items) = value else {
                return Err(refuse());
            };
            if let Some(index) = items.iter().position(|item| !is_scalar(item)) {
                return Err(error(
                    &indexed(path, index),
                    "expected a scalar value (a string, number, boolean or null)",
                ));
            }
            Ok(Operand::Value(value.clone()))
        }
        Op::Gt | Op::Gte | Op::Lt | Op::Lte => match value {
            Value::Number(_) => Ok(Operand::Value(value.clone())),
            Value::String(text) if parse_instant(text).is_some() => {
                Ok(Operand::Value(value.clone()))
            }
            Value::String(_) => Err(error(
                path,
                format!(
                    "{op} needs {ORDER}; this string is not an RFC 3339 instant \
                     (YYYY-MM-DDTHH:MM:SS, at most six fractional digits, then Z or ±HH:MM)"
                ),
            )),
            Value::Object(object) => {
                only_keys(object, path, &["ago"], "a relative time")?;
                let ago = object.get("ago").ok_or_else(refuse)?;
                Ok(Operand::Ago(duration(ago, &child(path, "ago"))?))
            }
            _ => Err(refuse()),
        },
        _ => Err(refuse()),
    }
}

fn dotted(path: &[String]) -> Value {
    Value::String(path.join("."))
}

fn comparison_json(object: &mut Map<String, Value>, op: Op, value: &Operand) {
    object.insert("op".to_owned(), Value::String(op.as_str().to_owned()));
    match value {
        Operand::Absent => {}
        Operand::Value(value) => {
            object.insert("value".to_owned(), value.clone());
        }
        Operand::Ago(window) => {
            let mut ago = Map::new();
            ago.insert("ago".to_owned(), Value::String(window.to_text()));
            object.insert("value".to_owned(), Value::Object(ago));
        }
    }
}

fn single(key: &str, value: Value) -> Value {
    let mut object = Map::new();
    object.insert(key.to_owned(), value);
    Value::Object(object)
}

/// What a condition depends on: ingestion re-evaluates a condition only when a message changes
/// one of these, and the scheduler re-evaluates time-dependent conditions as time passes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Dependencies {
    /// The top-level trait keys of every trait path (`address` for `address.city`).
    pub trait_keys: BTreeSet<String>,
    /// The event names named by event conditions (not `$any`).
    pub event_names: BTreeSet<String>,
    /// Some event condition is about `$any` event, so every event matters.
    pub any_event: bool,
    /// Some event condition has no `within` window, so it needs the whole history of its events.
    pub all_time_events: bool,
    /// The attributes used; `days_since_last_seen` brings `last_seen_at` along, which it is
    /// derived from.
    pub attributes: BTreeSet<Attribute>,
    /// The stage keys of `stage` conditions.
    pub stages: BTreeSet<String>,
    /// The purposes of `consent` conditions.
    pub consent_purposes: BTreeSet<String>,
    /// With the same facts, the answer can change as `now` moves: the condition has a `within`
    /// window, an `{"ago": D}` operand anywhere, or the `days_since_last_seen` attribute.
    pub time_dependent: bool,
    /// The longest `within` window or `ago` duration anywhere in the condition.
    pub longest_window: Option<Window>,
}

impl Dependencies {
    /// Whether an event named `name` can change the answer.
    pub fn depends_on_event(&self, name: &str) -> bool {
        self.any_event || self.event_names.contains(name)
    }

    /// Whether the profile's lifecycle stage can change the answer, through a `stage` condition or
    /// the `stage` attribute.
    pub fn depends_on_stage(&self) -> bool {
        !self.stages.is_empty() || self.attributes.contains(&Attribute::Stage)
    }

    /// Adds everything `other` depends on.
    pub fn absorb(&mut self, other: &Dependencies) {
        self.trait_keys.extend(other.trait_keys.iter().cloned());
        self.event_names.extend(other.event_names.iter().cloned());
        self.any_event |= other.any_event;
        self.all_time_events |= other.all_time_events;
        self.attributes.extend(other.attributes.iter().copied());
        self.stages.extend(other.stages.iter().cloned());
        self.consent_purposes
            .extend(other.consent_purposes.iter().cloned());
        self.time_dependent |= other.time_dependent;
        self.longest_window = self.longest_window.max(other.longest_window);
    }

    fn note_window(&mut self, window: Window) {
        self.time_dependent = true;
        self.longest_window = self.longest_window.max(Some(window));
    }

    fn note_operand(&mut self, operand: &Operand) {
        if let Operand::Ago(window) = operand {
            self.note_window(*window);
        }
    }
}

/// One event in a profile's history, as evaluation sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct EventFact {
    pub name: String,
    pub timestamp: DateTime<Utc>,
    pub properties: Map<String, Value>,
}

/// What evaluation knows of one profile. The caller passes the events the condition needs (see
/// [`Dependencies`]); events it leaves out are taken not to exist.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ProfileFacts {
    /// The merged traits.
    pub traits: Map<String, Value>,
    /// Attribute values: numbers, or RFC 3339 strings for instants. `stage` and
    /// `days_since_last_seen` are not read from here (rule 11 of the module docs).
    pub attributes: BTreeMap<Attribute, Value>,
    pub stage: Option<String>,
    /// Consent per purpose: true when granted, false when withdrawn.
    pub consents: BTreeMap<String, bool>,
    pub events: Vec<EventFact>,
}

impl Condition {
    /// The JSON form, which [`parse`] turns back into an equal condition. It is canonical: `where`
    /// is left out when empty, `count` when it is the default `{"gte": 1}`, and durations are
    /// written in their shortest unit (`"30d"`, `"36h"`).
    pub fn to_json(&self) -> Value {
        match self {
            Condition::All(items) => single("all", items.iter().map(Condition::to_json).collect()),
            Condition::Any(items) => single("any", items.iter().map(Condition::to_json).collect()),
            Condition::Not(inner) => single("not", inner.to_json()),
            Condition::Trait { path, op, value } => {
                let mut object = Map::new();
                object.insert("trait".to_owned(), dotted(path));
                comparison_json(&mut object, *op, value);
                Value::Object(object)
            }
            Condition::Attribute { name, op, value } => {
                let mut object = Map::new();
                object.insert(
                    "attribute".to_owned(),
                    Value::String(name.as_str().to_owned()),
                );
                comparison_json(&mut object, *op, value);
                Value::Object(object)
            }
            Condition::Event {
                name,
                filters,
                count,
                within,
            } => {
                let mut object = Map::new();
                let name = match name {
                    EventName::Named(name) => name.clone(),
                    EventName::Any => ANY_EVENT.to_owned(),
                };
                object.insert("event".to_owned(), Value::String(name));
                if !filters.is_empty() {
                    let predicates = filters
                        .iter()
                        .map(|predicate| {
                            let mut object = Map::new();
                            object.insert("property".to_owned(), dotted(&predicate.path));
                            comparison_json(&mut object, predicate.op, &predicate.value);
                            Value::Object(object)
                        })
                        .collect();
                    object.insert("where".to_owned(), Value::Array(predicates));
                }
                if *count != CountComparison::default() {
                    object.insert(
                        "count".to_owned(),
                        single(count.op.as_str(), Value::from(count.n)),
                    );
                }
                if let Some(within) = within {
                    object.insert("within".to_owned(), Value::String(within.to_text()));
                }
                Value::Object(object)
            }
            Condition::Stage(key) => single("stage", Value::String(key.clone())),
            Condition::Consent(purpose) => single("consent", Value::String(purpose.clone())),
        }
    }

    /// What this condition depends on.
    pub fn dependencies(&self) -> Dependencies {
        let mut dependencies = Dependencies::default();
        self.collect(&mut dependencies);
        dependencies
    }

    fn collect(&self, dependencies: &mut Dependencies) {
        match self {
            Condition::All(items) | Condition::Any(items) => {
                for item in items {
                    item.collect(dependencies);
                }
            }
            Condition::Not(inner) => inner.collect(dependencies),
            Condition::Trait { path, value, .. } => {
                if let Some(key) = path.first() {
                    dependencies.trait_keys.insert(key.clone());
                }
                dependencies.note_operand(value);
            }
            Condition::Attribute { name, value, .. } => {
                dependencies.attributes.insert(*name);
                if *name == Attribute::DaysSinceLastSeen {
                    dependencies.attributes.insert(Attribute::LastSeenAt);
                    dependencies.time_dependent = true;
                }
                dependencies.note_operand(value);
            }
            Condition::Event {
                name,
                filters,
                within,
                ..
            } => {
                match name {
                    EventName::Named(name) => {
                        dependencies.event_names.insert(name.clone());
                    }
                    EventName::Any => dependencies.any_event = true,
                }
                for predicate in filters {
                    dependencies.note_operand(&predicate.value);
                }
                match within {
                    Some(window) => dependencies.note_window(*window),
                    None => dependencies.all_time_events = true,
                }
            }
            Condition::Stage(key) => {
                dependencies.stages.insert(key.clone());
            }
            Condition::Consent(purpose) => {
                dependencies.consent_purposes.insert(purpose.clone());
            }
        }
    }

    /// Whether the profile satisfies this condition at `now`, by the rules of the module docs.
    /// Never panics; `now` is used at microsecond precision.
    pub fn evaluate(&self, profile: &ProfileFacts, now: DateTime<Utc>) -> bool {
        self.holds(profile, now.trunc_subsecs(6))
    }

    fn holds(&self, profile: &ProfileFacts, now: DateTime<Utc>) -> bool {
        match self {
            Condition::All(items) => items.iter().all(|item| item.holds(profile, now)),
            Condition::Any(items) => items.iter().any(|item| item.holds(profile, now)),
            Condition::Not(inner) => !inner.holds(profile, now),
            Condition::Trait { path, op, value } => {
                compare(lookup(&profile.traits, path), *op, value, now)
            }
            Condition::Attribute { name, op, value } => {
                let attribute = attribute_value(profile, *name, now);
                compare(attribute.as_deref(), *op, value, now)
            }
            Condition::Event {
                name,
                filters,
                count,
                within,
            } => {
                let since = within.map(|window| window.before(now));
                let matching = profile
                    .events
                    .iter()
                    .filter(|event| match name {
                        EventName::Named(name) => event.name == *name,
                        EventName::Any => true,
                    })
                    .filter(|event| {
                        since.is_none_or(|since| {
                            let timestamp = event.timestamp.trunc_subsecs(6);
                            since <= timestamp && timestamp <= now
                        })
                    })
                    .filter(|event| {
                        filters.iter().all(|predicate| {
                            compare(
                                lookup(&event.properties, &predicate.path),
                                predicate.op,
                                &predicate.value,
                                now,
                            )
                        })
                    })
                    .count();
                count.holds(u64::try_from(matching).unwrap_or(u64::MAX))
            }
            Condition::Stage(key) => profile.stage.as_deref() == Some(key.as_str()),
            Condition::Consent(purpose) => profile.consents.get(purpose) == Some(&true),
        }
    }
}

/// The value at a dot path, navigating objects only (rule 2). An empty path finds nothing.
fn lookup<'a>(root: &'a Map<String, Value>, path: &[String]) -> Option<&'a Value> {
    let (first, rest) = path.split_first()?;
    let mut current = root.get(first)?;
    for key in rest {
        current = current.as_object()?.get(key)?;
    }
    Some(current)
}

/// The value of an attribute (rule 11).
fn attribute_value(
    profile: &ProfileFacts,
    name: Attribute,
    now: DateTime<Utc>,
) -> Option<Cow<'_, Value>> {
    match name {
        Attribute::Stage => profile
            .stage
            .as_ref()
            .map(|stage| Cow::Owned(Value::String(stage.clone()))),
        Attribute::DaysSinceLastSeen => {
            let last_seen = profile
                .attributes
                .get(&Attribute::LastSeenAt)
                .and_then(Value::as_str)
                .and_then(parse_instant)?;
            let elapsed = now.signed_duration_since(last_seen);
            let days = match elapsed.num_microseconds() {
                Some(microseconds) => microseconds.div_euclid(MICROSECONDS_PER_DAY),
                // Beyond about 292,000 years microseconds overflow; whole seconds are as good.
                None => elapsed.num_seconds().div_euclid(SECONDS_PER_DAY),
            };
            Some(Cow::Owned(Value::from(days)))
        }
        other => profile.attributes.get(&other).map(Cow::Borrowed),
    }
}

/// Applies `op` with `operand` to a value that may be missing (rules 3 to 10).
fn compare(value: Option<&Value>, op: Op, operand: &Operand, now: DateTime<Utc>) -> bool {
    match op {
        Op::Exists => return value.is_some_and(|value| !value.is_null()),
        Op::NotExists => return value.is_none_or(Value::is_null),
        _ => {}
    }
    let (Some(value), Operand::Value(operand_value)) = (value, operand) else {
        // A missing value satisfies no other operator; an `ago` operand only orders.
        return match (value, operand) {
            (Some(value), Operand::Ago(window)) => {
                let instant = window.before(now);
                let ordering = value
                    .as_str()
                    .and_then(parse_instant)
                    .map(|value| value.cmp(&instant));
                ordering_satisfies(op, ordering)
            }
            _ => false,
        };
    };
    match op {
        Op::Eq => scalar_equal(value, operand_value) == Some(true),
        Op::Neq => scalar_equal(value, operand_value) == Some(false),
        Op::Gt | Op::Gte | Op::Lt | Op::Lte => ordering_satisfies(op, order(value, operand_value)),
        Op::Contains => match value {
            Value::String(text) => operand_value
                .as_str()
                .is_some_and(|needle| text.contains(needle)),
            Value::Array(items) => items
                .iter()
                .any(|item| scalar_equal(item, operand_value) == Some(true)),
            _ => false,
        },
        Op::StartsWith => match (value, operand_value) {
            (Value::String(text), Value::String(prefix)) => text.starts_with(prefix.as_str()),
            _ => false,
        },
        Op::In => match operand_value {
            Value::Array(items) => items
                .iter()
                .any(|item| scalar_equal(value, item) == Some(true)),
            _ => false,
        },
        Op::Exists | Op::NotExists => false,
    }
}

fn ordering_satisfies(op: Op, ordering: Option<Ordering>) -> bool {
    let Some(ordering) = ordering else {
        return false;
    };
    match op {
        Op::Gt => ordering == Ordering::Greater,
        Op::Gte => ordering != Ordering::Less,
        Op::Lt => ordering == Ordering::Less,
        Op::Lte => ordering != Ordering::Greater,
        _ => false,
    }
}

/// Some(equal) when both are scalars of the same kind; None otherwise (rules 4 and 5).
fn scalar_equal(left: &Value, right: &Value) -> Option<bool> {
    match (left, right) {
        (Value::Null, Value::Null) => Some(true),
        (Value::Bool(left), Value::Bool(right)) => Some(left == right),
        (Value::Number(left), Value::Number(right)) => Some(left.as_f64()? == right.as_f64()?),
        (Value::String(left), Value::String(right)) => Some(left == right),
        _ => None,
    }
}

/// The order of a value against a number or instant-string operand (rules 6 and 7).
fn order(value: &Value, operand: &Value) -> Option<Ordering> {
    match (value, operand) {
        (Value::Number(value), Value::Number(operand)) => {
            value.as_f64()?.partial_cmp(&operand.as_f64()?)
        }
        (Value::String(value), Value::String(operand)) => {
            Some(parse_instant(value)?.cmp(&parse_instant(operand)?))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use serde_json::json;

    fn now() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 3, 1, 12, 0, 0).unwrap()
    }

    fn object(value: Value) -> Map<String, Value> {
        match value {
            Value::Object(map) => map,
            other => panic!("not an object: {other}"),
        }
    }

    fn event(name: &str, days_ago: i64, properties: Value) -> EventFact {
        EventFact {
            name: name.to_owned(),
            timestamp: now() - Duration::days(days_ago),
            properties: object(properties),
        }
    }

    /// A profile with a little of everything, for the evaluation table.
    fn profile() -> ProfileFacts {
        ProfileFacts {
            traits: object(json!({
                "plan": "pro",
                "name": "Ada Lovelace",
                "age": 36,
                "score": 1.0,
                "zip": "75001",
                "vip": true,
                "nickname": null,
                "tags": ["beta", "early", 7],
                "address": {"city": "Paris", "geo": {"lat": 48.85}},
                "signed_up_at": "2026-02-20T10:00:00+01:00",
                "renewal": "2026-03-05T00:00:00Z",
                "items": [{"sku": "a"}],
                "note": "hello world"
            })),
            attributes: [
                (Attribute::FirstSeenAt, json!("2025-01-01T00:00:00Z")),
                (Attribute::LastSeenAt, json!("2026-02-26T18:00:00Z")),
                (Attribute::EventCount, json!(42)),
                (Attribute::RfmScore, json!(12)),
                (Attribute::ChurnRisk, json!(0.25)),
                (Attribute::Stage, json!("ignored")),
                (Attribute::DaysSinceLastSeen, json!(999)),
            ]
            .into_iter()
            .collect(),
            stage: Some("active".to_owned()),
            consents: [
                ("email_marketing".to_owned(), true),
                ("sms".to_owned(), false),
            ]
            .into_iter()
            .collect(),
            events: vec![
                event(
                    "Order Completed",
                    2,
                    json!({"revenue": 150, "currency": "EUR"}),
                ),
                event(
                    "Order Completed",
                    10,
                    json!({"revenue": 80, "currency": "EUR"}),
                ),
                event(
                    "Order Completed",
                    40,
                    json!({"revenue": 300, "currency": "USD"}),
                ),
                event("Page Viewed", 1, json!({"path": "/pricing"})),
                EventFact {
                    name: "Exactly Thirty Days".to_owned(),
                    timestamp: now() - Duration::days(30),
                    properties: Map::new(),
                },
                EventFact {
                    name: "Tomorrow".to_owned(),
                    timestamp: now() + Duration::hours(1),
                    properties: Map::new(),
                },
            ],
        }
    }

    fn parsed(value: Value) -> Condition {
        match parse(&value) {
            Ok(condition) => condition,
            Err(error) => panic!("{value} did not parse: {error}"),
        }
    }

    #[test]
    fn the_contract_example_parses_round_trips_and_holds_for_a_matching_profile() {
        let example = json!({"all": [
            {"trait": "plan", "op": "in", "value": ["pro", "enterprise"]},
            {"event": "Order Completed", "where": [{"property": "revenue", "op": "gte", "value": 100}],
             "count": {"gte": 2}, "within": "30d"},
            {"not": {"stage": "dormant"}},
            {"consent": "email_marketing"}
        ]});
        let condition = parsed(example.clone());
        assert_eq!(condition.to_json(), example);
        let mut facts = profile();
        assert!(
            !condition.evaluate(&facts, now()),
            "one big order in 30 days is not two"
        );
        facts
            .events
            .push(event("Order Completed", 29, json!({"revenue": 100})));
        assert!(condition.evaluate(&facts, now()));
        facts.stage = Some("dormant".to_owned());
        assert!(!condition.evaluate(&facts, now()));
    }

    #[test]
    fn every_shape_and_operator_evaluates_as_documented() {
        let cases = [
            // Logic.
            r#"true  {"all": []}"#,
            r#"false {"any": []}"#,
            r#"false {"not": {"all": []}}"#,
            r#"false {"all": [{"stage": "active"}, {"consent": "sms"}]}"#,
            r#"true  {"any": [{"stage": "active"}, {"consent": "sms"}]}"#,
            // eq and neq.
            r#"true  {"trait": "plan", "op": "eq", "value": "pro"}"#,
            r#"false {"trait": "plan", "op": "eq", "value": "Pro"}"#,
            r#"true  {"trait": "plan", "op": "neq", "value": "free"}"#,
            r#"false {"trait": "plan", "op": "neq", "value": "pro"}"#,
            r#"true  {"trait": "age", "op": "eq", "value": 36.0}"#,
            r#"true  {"trait": "score", "op": "eq", "value": 1}"#,
            r#"false {"trait": "zip", "op": "eq", "value": 75001}"#,
            r#"false {"trait": "zip", "op": "neq", "value": 75001}"#,
            r#"false {"trait": "age", "op": "neq", "value": "36"}"#,
            r#"true  {"trait": "vip", "op": "eq", "value": true}"#,
            r#"true  {"trait": "vip", "op": "neq", "value": false}"#,
            r#"false {"trait": "vip", "op": "neq", "value": 1}"#,
            r#"true  {"trait": "nickname", "op": "eq", "value": null}"#,
            r#"false {"trait": "nickname", "op": "neq", "value": "x"}"#,
            r#"false {"trait": "plan", "op": "neq", "value": null}"#,
            r#"false {"trait": "tags", "op": "eq", "value": "beta"}"#,
            r#"false {"trait": "tags", "op": "neq", "value": "beta"}"#,
            r#"false {"trait": "address", "op": "neq", "value": "Paris"}"#,
            r#"true  {"trait": "address.city", "op": "eq", "value": "Paris"}"#,
            r#"true  {"trait": "address.geo.lat", "op": "gt", "value": 48}"#,
            // Missing values.
            r#"false {"trait": "missing", "op": "neq", "value": "x"}"#,
            r#"false {"trait": "missing", "op": "eq", "value": null}"#,
            r#"true  {"trait": "missing", "op": "not_exists"}"#,
            r#"false {"trait": "missing", "op": "exists"}"#,
            r#"true  {"trait": "address.zip", "op": "not_exists"}"#,
            r#"true  {"trait": "plan.tier", "op": "not_exists"}"#,
            r#"false {"trait": "items.0", "op": "exists"}"#,
            r#"false {"trait": "nickname", "op": "exists"}"#,
            r#"true  {"trait": "nickname", "op": "not_exists"}"#,
            r#"true  {"trait": "vip", "op": "exists"}"#,
            r#"true  {"trait": "tags", "op": "exists"}"#,
            // Order: numbers, instants, ago.
            r#"true  {"trait": "age", "op": "gt", "value": 35.5}"#,
            r#"true  {"trait": "age", "op": "gte", "value": 36}"#,
            r#"false {"trait": "age", "op": "lt", "value": 36}"#,
            r#"true  {"trait": "age", "op": "lte", "value": 36}"#,
            r#"false {"trait": "zip", "op": "gt", "value": 1}"#,
            r#"false {"trait": "zip", "op": "lt", "value": 1}"#,
            r#"false {"trait": "plan", "op": "gt", "value": "2000-01-01T00:00:00Z"}"#,
            r#"true  {"trait": "signed_up_at", "op": "lt", "value": "2026-02-20T09:00:01Z"}"#,
            r#"true  {"trait": "signed_up_at", "op": "gte", "value": "2026-02-20T09:00:00Z"}"#,
            r#"false {"trait": "signed_up_at", "op": "gt", "value": "2026-02-20T09:00:00Z"}"#,
            r#"true  {"trait": "signed_up_at", "op": "gt", "value": {"ago": "30d"}}"#,
            r#"false {"trait": "signed_up_at", "op": "gt", "value": {"ago": "7d"}}"#,
            r#"true  {"trait": "renewal", "op": "gt", "value": {"ago": "1s"}}"#,
            r#"false {"trait": "age", "op": "gt", "value": {"ago": "1d"}}"#,
            r#"false {"trait": "missing", "op": "lt", "value": {"ago": "1d"}}"#,
            // contains, starts_with, in.
            r#"true  {"trait": "name", "op": "contains", "value": "Love"}"#,
            r#"false {"trait": "name", "op": "contains", "value": "love"}"#,
            r#"true  {"trait": "name", "op": "contains", "value": ""}"#,
            r#"true  {"trait": "tags", "op": "contains", "value": "beta"}"#,
            r#"true  {"trait": "tags", "op": "contains", "value": 7.0}"#,
            r#"false {"trait": "tags", "op": "contains", "value": "bet"}"#,
            r#"false {"trait": "zip", "op": "contains", "value": 75}"#,
            r#"false {"trait": "age", "op": "contains", "value": 3}"#,
            r#"true  {"trait": "name", "op": "starts_with", "value": "Ada"}"#,
            r#"false {"trait": "name", "op": "starts_with", "value": "ada"}"#,
            r#"false {"trait": "tags", "op": "starts_with", "value": "beta"}"#,
            r#"true  {"trait": "plan", "op": "in", "value": ["free", "pro"]}"#,
            r#"false {"trait": "plan", "op": "in", "value": []}"#,
            r#"true  {"trait": "age", "op": "in", "value": ["36", 36.0]}"#,
            r#"false {"trait": "zip", "op": "in", "value": [75001]}"#,
            r#"true  {"trait": "nickname", "op": "in", "value": [null]}"#,
            r#"false {"trait": "tags", "op": "in", "value": ["beta"]}"#,
            r#"false {"trait": "missing", "op": "in", "value": [null]}"#,
            // Attributes.
            r#"true  {"attribute": "event_count", "op": "gte", "value": 42}"#,
            r#"true  {"attribute": "rfm_score", "op": "in", "value": [11, 12]}"#,
            r#"true  {"attribute": "churn_risk", "op": "lt", "value": 0.5}"#,
            r#"true  {"attribute": "total_revenue", "op": "not_exists"}"#,
            r#"true  {"attribute": "first_seen_at", "op": "lt", "value": "2025-06-01T00:00:00Z"}"#,
            r#"true  {"attribute": "last_seen_at", "op": "gt", "value": {"ago": "7d"}}"#,
            r#"false {"attribute": "last_seen_at", "op": "gt", "value": {"ago": "2d"}}"#,
            r#"true  {"attribute": "stage", "op": "eq", "value": "active"}"#,
            r#"false {"attribute": "stage", "op": "eq", "value": "ignored"}"#,
            r#"true  {"attribute": "days_since_last_seen", "op": "eq", "value": 2}"#,
            r#"false {"attribute": "days_since_last_seen", "op": "gt", "value": 2}"#,
            // Events.
            r#"true  {"event": "Order Completed"}"#,
            r#"true  {"event": "Order Completed", "count": {"eq": 3}}"#,
            r#"false {"event": "Order Completed", "count": {"gt": 3}}"#,
            r#"false {"event": "Order Completed", "count": {"neq": 3}}"#,
            r#"true  {"event": "Order Completed", "within": "30d", "count": {"eq": 2}}"#,
            r#"true  {"event": "Order Completed", "within": "PT72H", "count": {"eq": 1}}"#,
            r#"false {"event": "order completed"}"#,
            r#"true  {"event": "Order Completed", "where": [{"property": "currency", "op": "eq", "value": "EUR"}, {"property": "revenue", "op": "gte", "value": 100}]}"#,
            r#"false {"event": "Order Completed", "where": [{"property": "currency", "op": "eq", "value": "USD"}], "within": "30d"}"#,
            r#"true  {"event": "Order Completed", "where": [{"property": "coupon", "op": "not_exists"}], "count": {"eq": 3}}"#,
            r#"true  {"event": "Signed Up", "count": {"eq": 0}}"#,
            r#"true  {"event": "Signed Up", "count": {"lt": 1}}"#,
            r#"true  {"event": "Signed Up", "count": {"lte": 0}, "within": "1d"}"#,
            r#"true  {"event": "$any", "count": {"eq": 6}}"#,
            r#"true  {"event": "$any", "within": "1d", "count": {"eq": 1}}"#,
            r#"true  {"event": "Exactly Thirty Days", "within": "30d"}"#,
            r#"false {"event": "Exactly Thirty Days", "within": "P29DT23H59M59S"}"#,
            r#"true  {"event": "Tomorrow"}"#,
            r#"false {"event": "Tomorrow", "within": "100d"}"#,
            // Stage and consent.
            r#"true  {"stage": "active"}"#,
            r#"false {"stage": "Active"}"#,
            r#"true  {"consent": "email_marketing"}"#,
            r#"false {"consent": "sms"}"#,
            r#"false {"consent": "push"}"#,
        ];
        let facts = profile();
        let mut failures = Vec::new();
        for case in cases {
            let (expected, text) = case.split_once(' ').unwrap();
            let expected: bool = expected.parse().unwrap();
            let condition = parsed(serde_json::from_str(text.trim()).unwrap());
            if condition.evaluate(&facts, now()) != expected {
                failures.push(format!("{text} should be {expected}"));
            }
        }
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    }

    #[test]
    fn days_since_last_seen_is_floored_and_missing_without_a_last_seen_instant() {
        let mut facts = ProfileFacts::default();
        let days = |facts: &ProfileFacts, at: DateTime<Utc>| {
            attribute_value(facts, Attribute::DaysSinceLastSeen, at).map(Cow::into_owned)
        };
        assert_eq!(days(&facts, now()), None);
        facts
            .attributes
            .insert(Attribute::LastSeenAt, json!("yesterday"));
        assert_eq!(days(&facts, now()), None);
        facts
            .attributes
            .insert(Attribute::LastSeenAt, json!("2026-02-28T12:00:00.000001Z"));
        assert_eq!(
            days(&facts, now()),
            Some(json!(0)),
            "a microsecond short of a day"
        );
        facts
            .attributes
            .insert(Attribute::LastSeenAt, json!("2026-02-28T12:00:00Z"));
        assert_eq!(days(&facts, now()), Some(json!(1)));
        facts
            .attributes
            .insert(Attribute::LastSeenAt, json!("2026-03-01T12:00:00.5Z"));
        assert_eq!(
            days(&facts, now()),
            Some(json!(-1)),
            "the future floors downwards"
        );
        let missing = parsed(json!({"attribute": "days_since_last_seen", "op": "not_exists"}));
        assert!(missing.evaluate(&ProfileFacts::default(), now()));
    }

    #[test]
    fn now_and_event_timestamps_are_used_at_microsecond_precision() {
        let boundary = now() - Duration::days(1);
        let facts = ProfileFacts {
            events: vec![EventFact {
                name: "Ping".to_owned(),
                timestamp: boundary + Duration::nanoseconds(999),
                properties: Map::new(),
            }],
            ..ProfileFacts::default()
        };
        let within_a_day = parsed(json!({"event": "Ping", "within": "1d"}));
        // With nanoseconds the event would lie outside the window when `now` carries 999 more.
        assert!(within_a_day.evaluate(&facts, now() + Duration::nanoseconds(999)));
    }

    #[test]
    fn invalid_conditions_name_the_first_offending_node_and_what_was_expected() {
        let cases = [
            r#"condition | expected a condition | "stage""#,
            r#"condition | found an empty object | {}"#,
            r#"condition | found the keys colour | {"colour": "red"}"#,
            r#"condition.all[0].colour | unknown key | {"all": [{"stage": "a", "colour": "red"}]}"#,
            r#"condition.any | unknown key | {"all": [], "any": []}"#,
            r#"condition.all | expected an array of conditions | {"all": {"stage": "a"}}"#,
            r#"condition.any[1] | expected a condition | {"any": [{"stage": "a"}, 3]}"#,
            r#"condition.not | expected a condition | {"not": [{"stage": "a"}]}"#,
            r#"condition.not.event | event name | {"not": {"event": 5}}"#,
            r#"condition.not.event | non-empty | {"not": {"event": ""}}"#,
            r#"condition.trait | dot path | {"trait": "", "op": "exists"}"#,
            r#"condition.trait | dot path | {"trait": "a..b", "op": "exists"}"#,
            r#"condition.trait | dot path | {"trait": "a.", "op": "exists"}"#,
            r#"condition.trait | dot path | {"trait": 7, "op": "exists"}"#,
            r#"condition.trait | at most 16 | {"trait": "a.b.c.d.e.f.g.h.i.j.k.l.m.n.o.p.q", "op": "exists"}"#,
            r#"condition.op | expected an operator | {"trait": "plan"}"#,
            r#"condition.op | one of eq, neq | {"trait": "plan", "op": "equals", "value": 1}"#,
            r#"condition.op | expected an operator | {"trait": "plan", "op": "EQ", "value": 1}"#,
            r#"condition.all[1].op | expected an operator | {"all": [{"stage": "a"}, {"trait": "plan", "op": 3}]}"#,
            r#"condition.value | eq needs a scalar | {"trait": "plan", "op": "eq"}"#,
            r#"condition.value | eq needs a scalar | {"trait": "plan", "op": "eq", "value": [1]}"#,
            r#"condition.value | neq needs a scalar | {"trait": "plan", "op": "neq", "value": {"ago": "1d"}}"#,
            r#"condition.value | exists takes no value | {"trait": "plan", "op": "exists", "value": true}"#,
            r#"condition.value | not_exists takes no value | {"trait": "plan", "op": "not_exists", "value": null}"#,
            r#"condition.value | in needs an array | {"trait": "plan", "op": "in", "value": "pro"}"#,
            r#"condition.value[1] | expected a scalar | {"trait": "plan", "op": "in", "value": ["pro", ["x"]]}"#,
            r#"condition.value | starts_with needs a string | {"trait": "plan", "op": "starts_with", "value": 1}"#,
            r#"condition.value | contains needs a scalar | {"trait": "plan", "op": "contains", "value": {"a": 1}}"#,
            r#"condition.value | not an RFC 3339 instant | {"trait": "plan", "op": "gt", "value": "pro"}"#,
            r#"condition.value | not an RFC 3339 instant | {"trait": "plan", "op": "gt", "value": "2026-01-01"}"#,
            r#"condition.value | lt needs a number | {"trait": "plan", "op": "lt", "value": true}"#,
            r#"condition.value.colour | unknown key | {"trait": "plan", "op": "lte", "value": {"ago": "1d", "colour": 1}}"#,
            r#"condition.value | gte needs a number | {"trait": "plan", "op": "gte", "value": {}}"#,
            r#"condition.value.ago | expected a duration | {"trait": "plan", "op": "gte", "value": {"ago": 30}}"#,
            r#"condition.value.ago | longer than zero | {"trait": "plan", "op": "gte", "value": {"ago": "0d"}}"#,
            r#"condition.attribute | rfm_score | {"attribute": "colour", "op": "exists"}"#,
            r#"condition.name | unknown key | {"attribute": "stage", "op": "exists", "name": "x"}"#,
            r#"condition.where | expected an array of property predicates | {"event": "A", "where": {}}"#,
            r#"condition.where[1] | expected a property predicate | {"event": "A", "where": [{"property": "a", "op": "exists"}, 1]}"#,
            r#"condition.all[0].where[2].value | eq needs | {"all": [{"event": "A", "where": [{"property": "a", "op": "exists"}, {"property": "a", "op": "exists"}, {"property": "b", "op": "eq"}]}]}"#,
            r#"condition.where[0].trait | unknown key | {"event": "A", "where": [{"property": "a", "op": "exists", "trait": "b"}]}"#,
            r#"condition.where[0].property | dot path | {"event": "A", "where": [{"op": "exists"}]}"#,
            r#"condition.count | exactly one of eq, neq, gt, gte, lt, lte | {"event": "A", "count": 2}"#,
            r#"condition.count | exactly one | {"event": "A", "count": {}}"#,
            r#"condition.count | exactly one | {"event": "A", "count": {"gte": 1, "lte": 3}}"#,
            r#"condition.count.atleast | unknown count operator | {"event": "A", "count": {"atleast": 1}}"#,
            r#"condition.count.gte | non-negative integer | {"event": "A", "count": {"gte": -1}}"#,
            r#"condition.count.gte | non-negative integer | {"event": "A", "count": {"gte": 1.5}}"#,
            r#"condition.count.gte | non-negative integer | {"event": "A", "count": {"gte": "2"}}"#,
            r#"condition.count.gte | at most 4294967295 | {"event": "A", "count": {"gte": 4294967296}}"#,
            r#"condition.within | expected a duration | {"event": "A", "within": "30 days"}"#,
            r#"condition.within | expected a duration | {"event": "A", "within": null}"#,
            r#"condition.within | years and months | {"event": "A", "within": "P1M"}"#,
            r#"condition.within | expected a duration | {"event": "A", "within": "101y"}"#,
            r#"condition.within | at most 100 years | {"event": "A", "within": "36526d"}"#,
            r#"condition.within | longer than zero | {"event": "A", "within": "-5d"}"#,
            r#"condition.within | fractions | {"event": "A", "within": "1.5h"}"#,
            r#"condition.when | unknown key | {"event": "A", "when": "1d"}"#,
            r#"condition.stage | lifecycle stage key | {"stage": ""}"#,
            r#"condition.op | unknown key | {"stage": "a", "op": "eq"}"#,
            r#"condition.consent | consent purpose | {"consent": true}"#,
        ];
        let mut failures = Vec::new();
        for case in cases {
            let mut fields = case.splitn(3, " | ");
            let (path, reason, text) = (
                fields.next().unwrap(),
                fields.next().unwrap(),
                fields.next().unwrap(),
            );
            let json: Value = serde_json::from_str(text).unwrap();
            match parse(&json) {
                Ok(condition) => failures.push(format!("{text} parsed as {condition:?}")),
                Err(error) if error.path != path || !error.reason.contains(reason) => {
                    failures.push(format!("{text}: got {error}; expected {path}: …{reason}…"))
                }
                Err(_) => {}
            }
        }
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    }

    #[test]
    fn an_error_displays_as_path_then_reason() {
        let error =
            parse(&json!({"all": [{"stage": "a"}, {"trait": "x", "op": "nope"}]})).unwrap_err();
        assert!(error
            .to_string()
            .starts_with("condition.all[1].op: expected an operator"));
    }

    fn nested_nots(levels: usize) -> Value {
        let mut condition = json!({"stage": "a"});
        for _ in 1..levels {
            condition = json!({ "not": condition });
        }
        condition
    }

    #[test]
    fn sixteen_levels_are_accepted_and_seventeen_are_refused_at_the_seventeenth() {
        assert!(parse(&nested_nots(16)).is_ok());
        let error = parse(&nested_nots(17)).unwrap_err();
        assert_eq!(error.path, format!("condition{}", ".not".repeat(16)));
        assert!(
            error.reason.contains("nested deeper than 16 levels"),
            "{error}"
        );
    }

    #[test]
    fn a_very_deep_document_is_refused_without_recursing_into_it() {
        // Deeper than serde_json would ever parse from text (128), yet shallow enough for the test
        // itself to build and drop the value on a test thread's stack.
        let error = parse(&nested_nots(1_000)).unwrap_err();
        assert!(error.reason.contains("deeper than 16"));
    }

    #[test]
    fn two_hundred_fifty_six_nodes_are_accepted_and_the_two_hundred_fifty_seventh_is_refused() {
        let leaves = |count: usize| json!({"all": vec![json!({"consent": "x"}); count]});
        assert!(
            parse(&leaves(255)).is_ok(),
            "255 leaves and the all make 256"
        );
        let error = parse(&leaves(256)).unwrap_err();
        assert_eq!(error.path, "condition.all[255]");
        assert!(error.reason.contains("more than 256 nodes"), "{error}");
    }

    #[test]
    fn where_predicates_count_as_nodes() {
        let predicates = vec![json!({"property": "a", "op": "exists"}); 255];
        assert!(parse(&json!({"event": "A", "where": predicates})).is_ok());
        let predicates = vec![json!({"property": "a", "op": "exists"}); 256];
        let error = parse(&json!({"event": "A", "where": predicates})).unwrap_err();
        assert_eq!(error.path, "condition.where[255]");
        assert!(error.reason.contains("more than 256 nodes"));
    }

    #[test]
    fn durations_in_both_notations_parse_to_whole_seconds() {
        let cases = [
            ("30d", 30 * 86_400),
            ("12h", 12 * 3600),
            ("15m", 15 * 60),
            ("90s", 90),
            ("007d", 7 * 86_400),
            ("P30D", 30 * 86_400),
            ("PT12H", 12 * 3600),
            ("P1DT2H", 86_400 + 2 * 3600),
            ("PT90S", 90),
            ("PT1M30S", 90),
            ("P2W", 14 * 86_400),
            ("P1W1D", 8 * 86_400),
            ("P1DT1H1M1S", 90_061),
            ("36525d", MAX_DURATION_SECONDS),
        ];
        for (text, seconds) in cases {
            assert_eq!(
                Window::parse(text).map(Window::num_seconds),
                Ok(seconds),
                "{text}"
            );
        }
    }

    #[test]
    fn bad_durations_are_refused_with_the_reason() {
        use DurationError::*;
        let cases = [
            ("", Malformed),
            ("d", Malformed),
            ("30", Malformed),
            ("30D", Malformed),
            ("30 d", Malformed),
            ("+30d", Malformed),
            ("30w", Malformed),
            ("1y", Malformed),
            ("p30d", Malformed),
            ("P", Malformed),
            ("PT", Malformed),
            ("P1DT", Malformed),
            ("P1H", Malformed),
            ("PT1D", Malformed),
            ("P1D1W", Malformed),
            ("PT1S1M", Malformed),
            ("P1D1D", Malformed),
            ("PD", Malformed),
            ("P1Y", CalendarUnit),
            ("P2M", CalendarUnit),
            ("P1.5D", Fraction),
            ("PT0,5H", Fraction),
            ("1.5h", Fraction),
            ("0d", NotPositive),
            ("PT0S", NotPositive),
            ("-1d", NotPositive),
            ("-P1D", NotPositive),
            ("-abc", Malformed),
            ("36526d", TooLong),
            ("P5300W", TooLong),
            ("99999999999999999999999s", TooLong),
            ("P9223372036854775807DT1S", TooLong),
        ];
        for (text, expected) in cases {
            assert_eq!(Window::parse(text), Err(expected), "{text:?}");
        }
        assert_eq!(
            Window::from_duration(Duration::milliseconds(1500)),
            Err(Fraction)
        );
    }

    #[test]
    fn a_window_is_written_in_its_largest_exact_unit() {
        let cases = [
            ("P2W", "14d"),
            ("PT36H", "36h"),
            ("PT90M", "90m"),
            ("PT120S", "2m"),
            ("90s", "90s"),
            ("P1DT1S", "86401s"),
        ];
        for (text, canonical) in cases {
            assert_eq!(Window::parse(text).unwrap().to_text(), canonical);
        }
    }

    #[test]
    fn instants_follow_the_strict_rfc_3339_grammar() {
        let accepted = [
            ("2026-01-31T00:00:00Z", "2026-01-31T00:00:00Z"),
            ("2026-01-31T01:30:00+01:30", "2026-01-31T00:00:00Z"),
            ("2026-01-30T23:00:00-01:00", "2026-01-31T00:00:00Z"),
            ("2026-01-31T00:00:00.123456Z", "2026-01-31T00:00:00.123456Z"),
            ("2026-01-31T00:00:00.1Z", "2026-01-31T00:00:00.100Z"),
            ("2024-02-29T00:00:00Z", "2024-02-29T00:00:00Z"),
            ("0001-01-01T00:00:00Z", "0001-01-01T00:00:00Z"),
        ];
        for (text, utc) in accepted {
            let expected = DateTime::parse_from_rfc3339(utc)
                .unwrap()
                .with_timezone(&Utc);
            assert_eq!(parse_instant(text), Some(expected), "{text}");
        }
        let refused = [
            "2026-01-31",
            "2026-01-31T00:00:00",
            "2026-01-31 00:00:00Z",
            "2026-01-31t00:00:00Z",
            "2026-01-31T00:00:00z",
            "2026-01-31T00:00:00.1234567Z",
            "2026-01-31T00:00:00.Z",
            "2026-01-31T00:00:00+0100",
            "2026-01-31T00:00:00+01",
            "2026-01-31T00:00:00+24:00",
            "2026-01-31T00:00:00+01:60",
            "2026-01-31T24:00:00Z",
            "2026-01-31T23:60:00Z",
            "2026-12-31T23:59:60Z",
            "2026-02-29T00:00:00Z",
            "2026-13-01T00:00:00Z",
            "2026-04-31T00:00:00Z",
            "0000-01-01T00:00:00Z",
            "+2026-01-31T00:00:00Z",
            "2026-01-31T00:00:00Z ",
            " 2026-01-31T00:00:00Z",
            "２０２６-01-31T00:00:00Z",
        ];
        for text in refused {
            assert_eq!(parse_instant(text), None, "{text}");
        }
    }

    #[test]
    fn to_json_round_trips_every_shape() {
        let cases = [
            json!({"all": [{"any": []}, {"not": {"consent": "email"}}]}),
            json!({"trait": "address.city", "op": "starts_with", "value": "Par"}),
            json!({"trait": "a", "op": "exists"}),
            json!({"trait": "a", "op": "in", "value": [1, "x", null, true, 2.5]}),
            json!({"attribute": "last_seen_at", "op": "lt", "value": {"ago": "36h"}}),
            json!({"attribute": "rfm_score", "op": "gte", "value": 9}),
            json!({"event": "$any", "within": "90s"}),
            json!({"event": "Order Completed", "where": [{"property": "a.b", "op": "contains", "value": 1}],
                   "count": {"lt": 3}}),
            json!({"stage": "active"}),
        ];
        for json in cases {
            let condition = parsed(json.clone());
            assert_eq!(condition.to_json(), json);
            assert_eq!(parse(&condition.to_json()), Ok(condition));
        }
    }

    #[test]
    fn to_json_writes_the_canonical_form() {
        let condition =
            parsed(json!({"event": "A", "where": [], "count": {"gte": 1}, "within": "P1W"}));
        assert_eq!(condition.to_json(), json!({"event": "A", "within": "7d"}));
        let ago = parsed(json!({"trait": "t", "op": "gt", "value": {"ago": "PT60M"}}));
        assert_eq!(
            ago.to_json(),
            json!({"trait": "t", "op": "gt", "value": {"ago": "1h"}})
        );
    }

    #[test]
    fn dependencies_list_what_a_message_can_change_and_whether_time_matters() {
        let condition = parsed(json!({"all": [
            {"trait": "address.city", "op": "eq", "value": "Paris"},
            {"trait": "plan", "op": "exists"},
            {"not": {"event": "Order Completed", "within": "30d",
                     "where": [{"property": "at", "op": "gt", "value": {"ago": "P60D"}}]}},
            {"any": [{"event": "$any", "within": "7d"}, {"event": "Signed Up"}]},
            {"attribute": "days_since_last_seen", "op": "lt", "value": 3},
            {"attribute": "stage", "op": "neq", "value": "x"},
            {"stage": "active"},
            {"consent": "email_marketing"}
        ]}));
        let dependencies = condition.dependencies();
        let strings = |items: &[&str]| items.iter().map(|item| item.to_string()).collect();
        assert_eq!(dependencies.trait_keys, strings(&["address", "plan"]));
        assert_eq!(
            dependencies.event_names,
            strings(&["Order Completed", "Signed Up"])
        );
        assert!(dependencies.any_event);
        assert!(dependencies.all_time_events);
        assert_eq!(
            dependencies.attributes,
            [
                Attribute::LastSeenAt,
                Attribute::Stage,
                Attribute::DaysSinceLastSeen
            ]
            .into_iter()
            .collect()
        );
        assert_eq!(dependencies.stages, strings(&["active"]));
        assert_eq!(dependencies.consent_purposes, strings(&["email_marketing"]));
        assert!(dependencies.time_dependent);
        assert_eq!(dependencies.longest_window, Window::parse("60d").ok());
        assert!(dependencies.depends_on_event("Anything"));
        assert!(dependencies.depends_on_stage());
    }

    #[test]
    fn a_condition_without_windows_ago_or_days_since_last_seen_is_not_time_dependent() {
        let condition = parsed(json!({"any": [
            {"event": "A", "count": {"gte": 3}},
            {"attribute": "last_seen_at", "op": "gt", "value": "2026-01-01T00:00:00Z"},
            {"attribute": "days_since_last_seen", "op": "exists"}
        ]}));
        let dependencies = condition.dependencies();
        assert!(
            dependencies.time_dependent,
            "days_since_last_seen moves with now"
        );
        let timeless = parsed(json!({"any": [
            {"event": "A", "count": {"gte": 3}},
            {"attribute": "last_seen_at", "op": "gt", "value": "2026-01-01T00:00:00Z"}
        ]}));
        let dependencies = timeless.dependencies();
        assert!(!dependencies.time_dependent);
        assert_eq!(dependencies.longest_window, None);
        assert!(!dependencies.depends_on_event("B"));
        assert!(!dependencies.depends_on_stage());
    }

    #[test]
    fn a_hand_built_operand_that_parse_would_refuse_never_holds() {
        let facts = profile();
        let odd = [
            Condition::Trait {
                path: vec!["plan".to_owned()],
                op: Op::Eq,
                value: Operand::Absent,
            },
            Condition::Trait {
                path: vec!["plan".to_owned()],
                op: Op::In,
                value: Operand::Value(json!("pro")),
            },
            Condition::Trait {
                path: vec!["plan".to_owned()],
                op: Op::Eq,
                value: Operand::Ago(Window::parse("1d").unwrap()),
            },
            Condition::Trait {
                path: Vec::new(),
                op: Op::Exists,
                value: Operand::Absent,
            },
        ];
        for condition in odd {
            assert!(!condition.evaluate(&facts, now()), "{condition:?}");
        }
    }

    #[test]
    fn a_window_reaching_before_the_earliest_instant_does_not_panic() {
        let facts = ProfileFacts {
            events: vec![EventFact {
                name: "A".to_owned(),
                timestamp: DateTime::<Utc>::MIN_UTC,
                properties: Map::new(),
            }],
            ..ProfileFacts::default()
        };
        let condition = parsed(json!({"event": "A", "within": "36525d"}));
        assert!(condition.evaluate(&facts, DateTime::<Utc>::MIN_UTC + Duration::days(1)));
    }
}
