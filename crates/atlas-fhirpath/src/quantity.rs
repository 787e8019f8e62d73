//! Quantities with UCUM units (a practical subset) and calendar duration keywords.

use crate::temporal::CalendarUnit;
use rust_decimal::Decimal;
use std::cmp::Ordering;
use std::fmt;
use std::str::FromStr;

/// A FHIRPath System.Quantity: a decimal value and a unit, which is either a
/// UCUM code (`'mg'`, `'[lb_av]'`, `'1'`) or a calendar duration keyword (`days`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Quantity {
    pub value: Decimal,
    pub unit: String,
}

const CALENDAR_WORDS: &[(&str, CalendarUnit)] = &[
    ("year", CalendarUnit::Year),
    ("years", CalendarUnit::Year),
    ("month", CalendarUnit::Month),
    ("months", CalendarUnit::Month),
    ("week", CalendarUnit::Week),
    ("weeks", CalendarUnit::Week),
    ("day", CalendarUnit::Day),
    ("days", CalendarUnit::Day),
    ("hour", CalendarUnit::Hour),
    ("hours", CalendarUnit::Hour),
    ("minute", CalendarUnit::Minute),
    ("minutes", CalendarUnit::Minute),
    ("second", CalendarUnit::Second),
    ("seconds", CalendarUnit::Second),
    ("millisecond", CalendarUnit::Millisecond),
    ("milliseconds", CalendarUnit::Millisecond),
];

/// Whether `word` is a calendar duration keyword (`year`, `months`, `day`, ...).
pub fn is_calendar_unit(word: &str) -> bool {
    CALENDAR_WORDS.iter().any(|(w, _)| *w == word)
}

fn calendar_word(word: &str) -> Option<CalendarUnit> {
    CALENDAR_WORDS
        .iter()
        .find(|(w, _)| *w == word)
        .map(|(_, u)| *u)
}

/// Dimension slots: m, g, s, mol, K, A, U, [iU], calendar-month.
const NDIM: usize = 9;
const DIM_NAMES: [&str; NDIM] = ["m", "g", "s", "mol", "K", "A", "U", "[iU]", "mo_cal"];
const CAL_MONTH: usize = 8;

#[derive(Debug, Clone, PartialEq)]
struct Canon {
    factor: Decimal,
    dims: [i8; NDIM],
}

fn dim(i: usize, factor: Decimal) -> Canon {
    let mut dims = [0; NDIM];
    dims[i] = 1;
    Canon { factor, dims }
}

fn d(s: &str) -> Decimal {
    Decimal::from_str(s).unwrap_or(Decimal::ONE)
}

/// Atoms that take metric prefixes.
fn metric_atom(a: &str) -> Option<Canon> {
    Some(match a {
        "m" => dim(0, Decimal::ONE),
        "g" => dim(1, Decimal::ONE),
        "s" => dim(2, Decimal::ONE),
        "mol" | "eq" => dim(3, Decimal::ONE),
        "K" => dim(4, Decimal::ONE),
        "A" => dim(5, Decimal::ONE),
        "U" => dim(6, Decimal::ONE),
        "l" | "L" => Canon {
            factor: d("0.001"),
            dims: [3, 0, 0, 0, 0, 0, 0, 0, 0],
        },
        "Pa" => Canon {
            factor: d("1000"),
            dims: [-1, 1, -2, 0, 0, 0, 0, 0, 0],
        },
        _ => return None,
    })
}

fn plain_atom(a: &str) -> Option<Canon> {
    Some(match a {
        "min" => dim(2, d("60")),
        "h" => dim(2, d("3600")),
        "d" => dim(2, d("86400")),
        "wk" => dim(2, d("604800")),
        "mo" => dim(2, d("2629800")),
        "a" => dim(2, d("31557600")),
        "[lb_av]" => dim(1, d("453.59237")),
        "[oz_av]" => dim(1, d("28.349523125")),
        "[in_i]" => dim(0, d("0.0254")),
        "[ft_i]" => dim(0, d("0.3048")),
        "[mi_i]" => dim(0, d("1609.344")),
        "[iU]" => dim(7, Decimal::ONE),
        "%" => Canon {
            factor: d("0.01"),
            dims: [0; NDIM],
        },
        "mm[Hg]" => Canon {
            factor: d("133322.387415"),
            dims: [-1, 1, -2, 0, 0, 0, 0, 0, 0],
        },
        _ => return None,
    })
}

const PREFIXES: &[(&str, i32)] = &[
    ("da", 1),
    ("Y", 24),
    ("Z", 21),
    ("E", 18),
    ("P", 15),
    ("T", 12),
    ("G", 9),
    ("M", 6),
    ("k", 3),
    ("h", 2),
    ("d", -1),
    ("c", -2),
    ("m", -3),
    ("u", -6),
    ("n", -9),
    ("p", -12),
    ("f", -15),
];

fn pow10(e: i32) -> Option<Decimal> {
    if e >= 0 {
        let mut v = Decimal::ONE;
        for _ in 0..e {
            v = v.checked_mul(Decimal::TEN)?;
        }
        Some(v)
    } else {
        Some(Decimal::new(1, e.unsigned_abs()))
    }
}

fn atom(a: &str) -> Option<Canon> {
    if let Some(c) = plain_atom(a).or_else(|| metric_atom(a)) {
        return Some(c);
    }
    for (p, e) in PREFIXES {
        if let Some(rest) = a.strip_prefix(p)
            && let Some(mut c) = metric_atom(rest)
        {
            c.factor = c.factor.checked_mul(pow10(*e)?)?;
            return Some(c);
        }
    }
    None
}

fn term(t: &str) -> Option<Canon> {
    if t == "1" {
        return Some(Canon {
            factor: Decimal::ONE,
            dims: [0; NDIM],
        });
    }
    let split = t
        .char_indices()
        .rev()
        .take_while(|(_, c)| c.is_ascii_digit() || *c == '-' || *c == '+')
        .last()
        .map(|(i, _)| i)
        .unwrap_or(t.len());
    let (a, e) = t.split_at(split);
    if a.is_empty() {
        return None;
    }
    let exp: i32 = if e.is_empty() { 1 } else { e.parse().ok()? };
    let c = atom(a)?;
    let mut out = Canon {
        factor: Decimal::ONE,
        dims: [0; NDIM],
    };
    for k in 0..NDIM {
        out.dims[k] = c.dims[k].checked_mul(i8::try_from(exp).ok()?)?;
    }
    for _ in 0..exp.unsigned_abs() {
        out.factor = out.factor.checked_mul(c.factor)?;
    }
    if exp < 0 {
        out.factor = Decimal::ONE.checked_div(out.factor)?;
    }
    Some(out)
}

fn canon(unit: &str) -> Option<Canon> {
    if let Some(cal) = calendar_word(unit) {
        return Some(match cal {
            CalendarUnit::Year => dim(CAL_MONTH, d("12")),
            CalendarUnit::Month => dim(CAL_MONTH, Decimal::ONE),
            CalendarUnit::Week => dim(2, d("604800")),
            CalendarUnit::Day => dim(2, d("86400")),
            CalendarUnit::Hour => dim(2, d("3600")),
            CalendarUnit::Minute => dim(2, d("60")),
            CalendarUnit::Second => dim(2, Decimal::ONE),
            CalendarUnit::Millisecond => dim(2, d("0.001")),
        });
    }
    // Drop annotations: `{score}` alone means 1.
    let mut u = String::with_capacity(unit.len());
    let mut depth = 0;
    for c in unit.chars() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            _ if depth == 0 => u.push(c),
            _ => {}
        }
    }
    if u.is_empty() {
        u.push('1');
    }
    let mut out = Canon {
        factor: Decimal::ONE,
        dims: [0; NDIM],
    };
    let mut rest = u.as_str();
    let mut divide = false;
    if let Some(r) = rest.strip_prefix('/') {
        rest = r;
        divide = true;
    }
    loop {
        let end = rest.find(['.', '/']).unwrap_or(rest.len());
        let c = term(&rest[..end])?;
        for k in 0..NDIM {
            out.dims[k] = if divide {
                out.dims[k].checked_sub(c.dims[k])?
            } else {
                out.dims[k].checked_add(c.dims[k])?
            };
        }
        out.factor = if divide {
            out.factor.checked_div(c.factor)?
        } else {
            out.factor.checked_mul(c.factor)?
        };
        if end == rest.len() {
            break;
        }
        divide = rest.as_bytes()[end] == b'/';
        rest = &rest[end + 1..];
    }
    Some(out)
}

fn dims_unit(dims: &[i8; NDIM]) -> String {
    let parts: Vec<String> = dims
        .iter()
        .enumerate()
        .filter(|(_, e)| **e != 0)
        .map(|(i, e)| {
            if *e == 1 {
                DIM_NAMES[i].to_string()
            } else {
                format!("{}{}", DIM_NAMES[i], e)
            }
        })
        .collect();
    if parts.is_empty() {
        "1".to_string()
    } else {
        parts.join(".")
    }
}

fn is_ucum_year_or_month(u: &str) -> bool {
    u == "a" || u == "mo"
}

fn is_calendar_year_or_month(u: &str) -> bool {
    matches!(
        calendar_word(u),
        Some(CalendarUnit::Year | CalendarUnit::Month)
    )
}

impl Quantity {
    pub fn new(value: Decimal, unit: impl Into<String>) -> Self {
        Quantity {
            value,
            unit: unit.into(),
        }
    }

    /// The calendar unit for date arithmetic; UCUM `a` and `mo` are not calendar units.
    pub(crate) fn calendar_unit(&self) -> Option<CalendarUnit> {
        calendar_word(&self.unit).or(match self.unit.as_str() {
            "wk" => Some(CalendarUnit::Week),
            "d" => Some(CalendarUnit::Day),
            "h" => Some(CalendarUnit::Hour),
            "min" => Some(CalendarUnit::Minute),
            "s" => Some(CalendarUnit::Second),
            "ms" => Some(CalendarUnit::Millisecond),
            _ => None,
        })
    }

    fn canonical(&self) -> Option<(Decimal, [i8; NDIM])> {
        let c = canon(&self.unit)?;
        Some((self.value.checked_mul(c.factor)?, c.dims))
    }

    /// Whether both units measure the same dimension (`1 'cm'` and `1 '[in_i]'`).
    pub fn comparable(&self, other: &Quantity) -> bool {
        match (canon(&self.unit), canon(&other.unit)) {
            (Some(a), Some(b)) => a.dims == b.dims,
            _ => false,
        }
    }

    fn year_month_mismatch(&self, other: &Quantity) -> bool {
        (is_calendar_year_or_month(&self.unit) && is_ucum_year_or_month(&other.unit))
            || (is_ucum_year_or_month(&self.unit) && is_calendar_year_or_month(&other.unit))
    }

    /// Ordering after unit conversion; `None` when the units are not comparable.
    pub fn compare(&self, other: &Quantity) -> Option<Ordering> {
        if self.unit == other.unit {
            return Some(self.value.cmp(&other.value));
        }
        if self.year_month_mismatch(other) {
            return None;
        }
        let (a, da) = self.canonical()?;
        let (b, db) = other.canonical()?;
        (da == db).then(|| a.cmp(&b))
    }

    /// FHIRPath `=`: `None` when not comparable.
    pub fn equals(&self, other: &Quantity) -> Option<bool> {
        self.compare(other).map(|o| o == Ordering::Equal)
    }

    /// FHIRPath `~`: compared at the precision of the less precise value.
    pub fn equivalent(&self, other: &Quantity) -> bool {
        if self.year_month_mismatch(other) {
            return false;
        }
        let (Some((a, da)), Some((b, db))) = (self.canonical(), other.canonical()) else {
            return false;
        };
        if da != db {
            return false;
        }
        crate::value::decimal_equivalent(a, b)
    }

    pub(crate) fn add(&self, other: &Quantity, negate: bool) -> Option<Quantity> {
        let rhs = if negate { -other.value } else { other.value };
        if self.unit == other.unit {
            return Some(Quantity::new(
                self.value.checked_add(rhs)?,
                self.unit.clone(),
            ));
        }
        let a = canon(&self.unit)?;
        let b = canon(&other.unit)?;
        if a.dims != b.dims || self.year_month_mismatch(other) {
            return None;
        }
        let converted = rhs.checked_mul(b.factor)?.checked_div(a.factor)?;
        Some(Quantity::new(
            self.value.checked_add(converted)?,
            self.unit.clone(),
        ))
    }

    pub(crate) fn mul(&self, other: &Quantity, divide: bool) -> Option<Quantity> {
        let a = canon(&self.unit)?;
        let b = canon(&other.unit)?;
        let mut dims = [0i8; NDIM];
        for (k, d) in dims.iter_mut().enumerate() {
            *d = if divide {
                a.dims[k].checked_sub(b.dims[k])?
            } else {
                a.dims[k].checked_add(b.dims[k])?
            };
        }
        let va = self.value.checked_mul(a.factor)?;
        let vb = other.value.checked_mul(b.factor)?;
        let v = if divide {
            va.checked_div(vb)?
        } else {
            va.checked_mul(vb)?
        };
        Some(Quantity::new(v, dims_unit(&dims)))
    }

    /// Convert to another unit of the same dimension.
    pub fn convert_to(&self, unit: &str) -> Option<Quantity> {
        if unit == self.unit {
            return Some(self.clone());
        }
        let a = canon(&self.unit)?;
        let b = canon(unit)?;
        if a.dims != b.dims {
            return None;
        }
        Some(Quantity::new(
            self.value.checked_mul(a.factor)?.checked_div(b.factor)?,
            unit,
        ))
    }

    /// Parse the FHIRPath string form: `1`, `1.5 'mg'`, `4 days`.
    pub fn parse(s: &str) -> Option<Quantity> {
        let s = s.trim();
        let (num, rest) = match s.find(|c: char| c.is_whitespace()) {
            Some(i) => (&s[..i], s[i..].trim()),
            None => (s, ""),
        };
        if !crate::value::is_decimal_text(num) {
            return None;
        }
        let value = Decimal::from_str(num).ok()?;
        if rest.is_empty() {
            return Some(Quantity::new(value, "1"));
        }
        if let Some(q) = rest.strip_prefix('\'').and_then(|r| r.strip_suffix('\'')) {
            return Some(Quantity::new(value, q));
        }
        is_calendar_unit(rest).then(|| Quantity::new(value, rest))
    }
}

impl fmt::Display for Quantity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if is_calendar_unit(&self.unit) {
            write!(f, "{} {}", self.value, self.unit)
        } else {
            write!(f, "{} '{}'", self.value, self.unit)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(v: &str, u: &str) -> Quantity {
        Quantity::new(d(v), u)
    }

    #[test]
    fn converts_common_units() {
        assert_eq!(q("4.0000", "g").equals(&q("4000.0", "mg")), Some(true));
        assert_eq!(q("7", "days").equals(&q("1", "week")), Some(true));
        assert_eq!(q("7", "days").equals(&q("1", "wk")), Some(true));
        assert_eq!(q("1", "a").equals(&q("1", "year")), None);
        assert_eq!(
            q("6", "days").compare(&q("1", "week")),
            Some(Ordering::Less)
        );
        assert_eq!(
            q("185", "[lb_av]").compare(&q("100", "kg")),
            Some(Ordering::Less)
        );
        assert!(q("1", "cm").comparable(&q("1", "[in_i]")));
        assert!(!q("1", "cm").comparable(&q("1", "s")));
    }

    #[test]
    fn multiplies_and_divides_units() {
        let m2 = q("2.0", "cm").mul(&q("2.0", "m"), false).expect("mul");
        assert_eq!(m2.equals(&q("0.040", "m2")), Some(true));
        let r = q("4.0", "g").mul(&q("2.0", "m"), true).expect("div");
        assert_eq!(r.equals(&q("2", "g/m")), Some(true));
        let one = q("1.0", "m").mul(&q("1.0", "m"), true).expect("div");
        assert_eq!(one.equals(&q("1", "1")), Some(true));
    }

    #[test]
    fn equivalence_uses_least_precision() {
        assert!(q("4", "g").equivalent(&q("4040", "mg")));
        assert!(!q("4.00", "g").equivalent(&q("4040", "mg")));
    }
}
