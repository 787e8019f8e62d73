//! When a patient is seen, and why: check-ups by age, follow-ups of chronic
//! conditions, acute illness, asthma attacks and admissions.

use super::codes::{self as k, Code};
use super::person::{CHRONIC, CHRONIC_COUNT, Chronic, Person};
use crate::rng::Stream;
use crate::time::DAY;

/// How far back each history reaches from its end (death or the end date).
const HISTORY_DAYS: i64 = 5 * 365;

/// An acute illness, the reason of an unplanned visit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Acute {
    Sinusitis,
    Bronchitis,
    Pharyngitis,
    Strep,
    Otitis,
    Pneumonia,
    AsthmaAttack,
}

impl Acute {
    pub(super) fn code(self) -> Code {
        match self {
            Acute::Sinusitis => k::COND_SINUSITIS,
            Acute::Bronchitis => k::COND_BRONCHITIS,
            Acute::Pharyngitis => k::COND_PHARYNGITIS,
            Acute::Strep => k::COND_STREP,
            Acute::Otitis => k::COND_OTITIS,
            Acute::Pneumonia => k::COND_PNEUMONIA,
            Acute::AsthmaAttack => k::COND_ASTHMA,
        }
    }

    pub(super) fn complaint(self) -> &'static str {
        match self {
            Acute::Sinusitis => "nasal congestion and facial pressure",
            Acute::Bronchitis => "a cough and chest congestion",
            Acute::Pharyngitis => "a sore throat and mild fever",
            Acute::Strep => "a severe sore throat and fever",
            Acute::Otitis => "ear pain and irritability",
            Acute::Pneumonia => "fever, productive cough and shortness of breath",
            Acute::AsthmaAttack => "wheezing and shortness of breath",
        }
    }

    /// How long the illness lasts after the visit, in days.
    pub(super) fn days(self) -> (i64, i64) {
        match self {
            Acute::Pneumonia => (10, 28),
            Acute::Sinusitis | Acute::Bronchitis => (7, 21),
            _ => (4, 12),
        }
    }
}

/// What kind of visit, and for which illness.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    Wellness,
    FollowUp,
    Symptom(Acute),
    Emergency(Acute),
    Inpatient(Acute),
}

/// One planned visit.
#[derive(Debug, Clone, Copy)]
pub(super) struct Plan {
    pub(super) day: i64,
    pub(super) kind: Kind,
    /// Chronic conditions diagnosed at this visit (bits of `Chronic`).
    pub(super) diagnoses: u8,
}

/// Days to the next well-child visit after `age_days` (AAP schedule under 3).
fn well_child_step(age_days: i64) -> i64 {
    const MILESTONES: [i64; 11] = [4, 14, 61, 122, 183, 274, 365, 456, 548, 730, 913];
    MILESTONES
        .iter()
        .find(|&&m| m > age_days)
        .map_or(365, |m| m - age_days)
}

/// Every visit of `p`'s history, in day order: check-ups by age (the
/// well-child schedule under 3, yearly to 18 and from 50, every three years
/// between), chronic conditions marked on the first check-up after their
/// onset, follow-ups of diagnosed chronic conditions, and month by month
/// chances of acute illness, asthma attacks and pneumonia admissions.
pub(super) fn plan_encounters(s: &mut Stream, p: &Person) -> Vec<Plan> {
    let end_day = (p.hist_end - 1).div_euclid(DAY);
    let start_day = p.birth_day.max(end_day - HISTORY_DAYS);
    let age_years = |day: i64| (day - p.birth_day) as f64 / 365.2425;
    let interval = |day: i64| -> i64 {
        let age_days = day - p.birth_day;
        match age_years(day) {
            a if a < 3.0 => well_child_step(age_days),
            a if !(18.0..50.0).contains(&a) => 365,
            _ => 3 * 365,
        }
    };

    // Check-ups.
    let mut plans = Vec::new();
    let mut day = if p.birth_day >= start_day {
        p.birth_day + 4
    } else {
        start_day + s.int(0, interval(start_day))
    };
    while day < end_day {
        plans.push(Plan {
            day,
            kind: Kind::Wellness,
            diagnoses: 0,
        });
        let step = interval(day);
        day += if step >= 365 {
            step + s.int(-20, 21)
        } else {
            step
        };
    }

    // Chronic conditions are found at the first check-up after their onset.
    let mut first_diag: Option<i64> = None;
    let mut diag_day = [None; CHRONIC_COUNT];
    for c in CHRONIC {
        let Some(onset) = p.onset[c as usize] else {
            continue;
        };
        let onset_day = onset.div_euclid(DAY);
        if let Some(plan) = plans.iter_mut().find(|w| w.day >= onset_day) {
            plan.diagnoses |= c.bit();
            diag_day[c as usize] = Some(plan.day);
            first_diag = Some(first_diag.map_or(plan.day, |d: i64| d.min(plan.day)));
        }
    }
    // Diabetes found at the same visit as prediabetes: record only diabetes.
    if let (Some(pre), Some(dm)) = (
        diag_day[Chronic::Prediabetes as usize],
        diag_day[Chronic::Diabetes as usize],
    ) && pre == dm
    {
        for plan in plans.iter_mut().filter(|w| w.day == pre) {
            plan.diagnoses &= !Chronic::Prediabetes.bit();
        }
    }

    // Follow-ups for chronic conditions: every six months for diabetics, else
    // yearly; a check-up within four months makes one unnecessary.
    if let Some(first) = first_diag {
        let dm_day = diag_day[Chronic::Diabetes as usize];
        let checkups: Vec<i64> = plans.iter().map(|w| w.day).collect();
        let mut day = first;
        loop {
            let months = if dm_day.is_some_and(|d| d <= day) {
                182
            } else {
                365
            };
            day += months + s.int(-15, 16);
            if day >= end_day {
                break;
            }
            if !checkups.iter().any(|&w| (w - day).abs() < 120) {
                plans.push(Plan {
                    day,
                    kind: Kind::FollowUp,
                    diagnoses: 0,
                });
            }
        }
    }

    // Acute illness, month by month.
    let asthma_day = diag_day[Chronic::Asthma as usize];
    let mut month = start_day;
    while month < end_day {
        let age = age_years(month);
        let rate = match age {
            a if a < 5.0 => 0.7,
            a if a < 18.0 => 0.35,
            a if a < 65.0 => 0.2,
            _ => 0.3,
        };
        if s.chance(rate / 12.0) {
            let day = month + s.int(0, 30);
            let illness = if age < 12.0 {
                s.pick(&[
                    Acute::Otitis,
                    Acute::Otitis,
                    Acute::Strep,
                    Acute::Pharyngitis,
                    Acute::Bronchitis,
                ])
            } else {
                s.pick(&[
                    Acute::Sinusitis,
                    Acute::Sinusitis,
                    Acute::Bronchitis,
                    Acute::Pharyngitis,
                    Acute::Strep,
                ])
            };
            let kind = if s.chance(0.12) {
                Kind::Emergency(illness)
            } else {
                Kind::Symptom(illness)
            };
            if day > p.birth_day && day < end_day {
                plans.push(Plan {
                    day,
                    kind,
                    diagnoses: 0,
                });
            }
        }
        // Asthma attacks after the diagnosis.
        if asthma_day.is_some_and(|d| d <= month) && s.chance(0.15 / 12.0) {
            let day = month + s.int(0, 30);
            if day < end_day {
                plans.push(Plan {
                    day,
                    kind: Kind::Emergency(Acute::AsthmaAttack),
                    diagnoses: 0,
                });
            }
        }
        // Admissions for pneumonia, likelier when old or chronically ill.
        let mut p_admit = 0.004 + if age >= 65.0 { 0.03 } else { 0.0 };
        if diag_day[Chronic::Diabetes as usize].is_some_and(|d| d <= month) {
            p_admit += 0.02;
        }
        if s.chance(p_admit / 12.0) {
            let day = month + s.int(0, 30);
            if day > p.birth_day && day < end_day {
                plans.push(Plan {
                    day,
                    kind: Kind::Inpatient(Acute::Pneumonia),
                    diagnoses: 0,
                });
            }
        }
        month += 30;
    }

    plans.sort_by_key(|plan| plan.day);
    plans
}
