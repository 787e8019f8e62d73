//! A patient's demographics and health model.
//!
//! Each patient gets body-size, blood-pressure and lab baselines plus onset
//! times for chronic conditions. Physiology follows the onsets whether or not
//! they are diagnosed (blood pressure creeps up before hypertension is found,
//! A1c rises with diabetes), and medications move it back. Only exact IEEE
//! arithmetic is used, so values are the same on every platform.

use super::codes::{self as k, Code};
use super::patient::Ctx;
use super::pool::Pool;
use crate::rng::Stream;
use crate::time::DAY;

/// Mean Gregorian year in seconds.
const YEAR: f64 = 31_556_952.0;

/// The chronic conditions the model knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Chronic {
    Hypertension = 0,
    Hyperlipidemia = 1,
    Prediabetes = 2,
    Diabetes = 3,
    Asthma = 4,
}

pub(super) const CHRONIC_COUNT: usize = 5;
pub(super) const CHRONIC: [Chronic; CHRONIC_COUNT] = [
    Chronic::Hypertension,
    Chronic::Hyperlipidemia,
    Chronic::Prediabetes,
    Chronic::Diabetes,
    Chronic::Asthma,
];

impl Chronic {
    pub(super) fn bit(self) -> u8 {
        1 << self as u8
    }
}

/// Tobacco use at a point in time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Smoking {
    Never,
    Former,
    Current,
}

/// A patient's fixed traits; everything time-dependent is derived from them.
pub(super) struct Person {
    pub(super) id: String,
    pub(super) female: bool,
    pub(super) birth_day: i64,
    pub(super) birth: i64,
    pub(super) death: Option<i64>,
    /// `min(death, end)`: nothing happens after this instant.
    pub(super) hist_end: i64,
    pub(super) given: Vec<&'static str>,
    pub(super) family: &'static str,
    pub(super) gp: usize,
    pub(super) org: usize,
    pub(super) hospital: usize,
    pub(super) adult_height: f64,
    pub(super) bmi_base: f64,
    pub(super) bmi_slope: f64,
    pub(super) sbp_base: f64,
    pub(super) dbp_offset: f64,
    pub(super) hr_base: f64,
    pub(super) a1c_base: f64,
    pub(super) chol_base: f64,
    pub(super) creat_base: f64,
    pub(super) hgb_base: f64,
    /// Ages (years) at which smoking started and stopped.
    pub(super) smoke_start: Option<f64>,
    pub(super) smoke_quit: Option<f64>,
    /// Onset instants of chronic conditions, indexed by `Chronic`.
    pub(super) onset: [Option<i64>; CHRONIC_COUNT],
    pub(super) htn_code: Code,
}

/// Fraction of adult height reached at an age (years).
fn growth_fraction(age: f64) -> f64 {
    const CURVE: [(f64, f64); 11] = [
        (0.0, 0.29),
        (1.0, 0.43),
        (2.0, 0.50),
        (4.0, 0.58),
        (6.0, 0.66),
        (8.0, 0.73),
        (10.0, 0.79),
        (12.0, 0.86),
        (14.0, 0.93),
        (16.0, 0.98),
        (18.0, 1.0),
    ];
    for w in CURVE.windows(2) {
        let ((a0, f0), (a1, f1)) = (w[0], w[1]);
        if age < a1 {
            return f0 + (f1 - f0) * ((age - a0) / (a1 - a0)).max(0.0);
        }
    }
    1.0
}

impl Person {
    pub(super) fn sample(s: &mut Stream, ctx: &Ctx<'_>) -> Person {
        let id = s.uuid();
        let female = s.chance(0.51);
        let end_day = ctx.end.div_euclid(DAY);
        let (lo, hi) = k::weighted(
            &[
                ((0.0, 5.0), 0.06),
                ((5.0, 18.0), 0.16),
                ((18.0, 45.0), 0.36),
                ((45.0, 65.0), 0.25),
                ((65.0, 85.0), 0.14),
                ((85.0, 100.0), 0.03),
            ],
            s.unit(),
        );
        let age = s.uniform(lo, hi);
        let birth_day = end_day - 1 - (age * 365.2425) as i64;
        let birth = birth_day * DAY + s.int(0, DAY);
        let p_dead = if age < 50.0 {
            0.01
        } else {
            0.01 + (age - 50.0) * 0.007
        };
        let death = if s.chance(p_dead) {
            let first = (birth_day + 2).max(end_day - 10 * 365);
            (first < end_day).then(|| s.int(first, end_day) * DAY + s.int(0, DAY))
        } else {
            None
        };
        let hist_end = death.unwrap_or(ctx.end).min(ctx.end);

        let given_pool = if female {
            k::FEMALE_GIVEN
        } else {
            k::MALE_GIVEN
        };
        let mut given = vec![s.pick(given_pool)];
        if s.chance(0.4) {
            let middle = s.pick(given_pool);
            if middle != given[0] {
                given.push(middle);
            }
        }
        let family = s.pick(k::FAMILY);
        let gp = s.index(ctx.pool.practitioners.len());
        let org = ctx.pool.org_of(gp);

        let adult_height = if female {
            s.normal(162.5, 6.5)
        } else {
            s.normal(176.0, 7.0)
        };
        let bmi_base = s.normal(27.5, 4.5).clamp(17.5, 48.0);
        let bmi_slope = s.normal(0.08, 0.12);
        let smoke_start = s.chance(0.38).then(|| s.uniform(14.0, 26.0));
        let smoke_quit =
            smoke_start.and_then(|st| s.chance(0.6).then(|| st + s.uniform(2.0, 35.0)));

        let mut person = Person {
            id,
            female,
            birth_day,
            birth,
            death,
            hist_end,
            given,
            family,
            gp,
            org,
            hospital: Pool::hospital_of(org),
            adult_height,
            bmi_base,
            bmi_slope,
            sbp_base: s.normal(112.0, 7.0),
            dbp_offset: s.normal(10.0, 3.5),
            hr_base: s.normal(72.0, 6.0),
            a1c_base: s.normal(5.2, 0.22),
            chol_base: s.normal(172.0, 22.0),
            creat_base: if female {
                s.normal(0.74, 0.1)
            } else {
                s.normal(0.95, 0.12)
            },
            hgb_base: if female {
                s.normal(13.5, 0.7)
            } else {
                s.normal(15.1, 0.8)
            },
            smoke_start,
            smoke_quit,
            onset: [None; CHRONIC_COUNT],
            htn_code: if s.chance(0.5) {
                k::COND_HTN_ESSENTIAL
            } else {
                k::COND_HTN
            },
        };
        person.sample_onsets(s);
        person
    }

    fn sample_onsets(&mut self, s: &mut Stream) {
        let age_now = self.age(self.hist_end);
        let bmi_now = self.bmi_adult(age_now);
        let at = |age: f64| -> i64 { self.birth + (age * YEAR) as i64 };
        let mut onset = [None; CHRONIC_COUNT];
        if age_now >= 25.0 {
            let p = (0.03 + 0.011 * (age_now - 25.0) + 0.012 * (bmi_now - 27.0).max(0.0)).min(0.8);
            if s.chance(p) {
                onset[Chronic::Hypertension as usize] =
                    Some(at(s.uniform((age_now - 40.0).max(25.0), age_now)));
            }
        }
        if age_now >= 30.0 {
            let p = (0.02 + 0.009 * (age_now - 30.0)).min(0.6);
            if s.chance(p) {
                onset[Chronic::Hyperlipidemia as usize] =
                    Some(at(s.uniform((age_now - 35.0).max(30.0), age_now)));
            }
        }
        if age_now >= 20.0 {
            let p = (0.04 + 0.02 * (bmi_now - 25.0).max(0.0) + 0.004 * (age_now - 20.0)).min(0.6);
            if s.chance(p) {
                let pre_age = s.uniform((age_now - 30.0).max(20.0), age_now);
                onset[Chronic::Prediabetes as usize] = Some(at(pre_age));
                let dm_age = pre_age + s.uniform(1.0, 10.0);
                if s.chance(0.4) && dm_age < age_now {
                    onset[Chronic::Diabetes as usize] = Some(at(dm_age));
                }
            }
        }
        if s.chance(0.09) {
            let asthma_age = s.uniform(1.0, 12.0);
            if asthma_age < age_now {
                onset[Chronic::Asthma as usize] = Some(at(asthma_age));
            }
        }
        self.onset = onset;
    }

    pub(super) fn age(&self, t: i64) -> f64 {
        (t - self.birth) as f64 / YEAR
    }

    fn years_since(&self, c: Chronic, t: i64) -> Option<f64> {
        self.onset[c as usize].map(|o| (t - o) as f64 / YEAR)
    }

    pub(super) fn smoking_at(&self, t: i64) -> Smoking {
        let age = self.age(t);
        match (self.smoke_start, self.smoke_quit) {
            (Some(st), Some(q)) if age >= q && q > st => Smoking::Former,
            (Some(st), _) if age >= st => Smoking::Current,
            _ => Smoking::Never,
        }
    }

    pub(super) fn bmi_adult(&self, age: f64) -> f64 {
        (self.bmi_base + self.bmi_slope * (age - 40.0)).clamp(16.5, 55.0)
    }

    /// Noise-free height (cm) at `t`.
    pub(super) fn height(&self, t: i64) -> f64 {
        let age = self.age(t);
        if age < 18.0 {
            self.adult_height * growth_fraction(age)
        } else {
            self.adult_height - (age - 60.0).max(0.0) * 0.12
        }
    }

    /// Noise-free weight (kg) at `t`.
    pub(super) fn weight(&self, t: i64) -> f64 {
        let age = self.age(t);
        if age < 2.0 {
            let base = if age < 1.0 {
                3.4 + 6.6 * age
            } else {
                10.0 + 2.2 * (age - 1.0)
            };
            base * (1.0 + (self.bmi_base - 27.5) * 0.01)
        } else {
            let bmi = if age < 18.0 {
                15.8 + (self.bmi_adult(18.0) - 15.8) * ((age - 2.0) / 16.0)
            } else {
                self.bmi_adult(age)
            };
            let h = self.height(t) / 100.0;
            bmi * h * h
        }
    }
}

/// Medications currently taken, for the physiology.
#[derive(Default, Clone, Copy)]
pub(super) struct OnMeds {
    pub(super) lisinopril: bool,
    pub(super) amlodipine: bool,
    pub(super) statin: bool,
    pub(super) metformin_since: Option<i64>,
}

impl Person {
    pub(super) fn blood_pressure(&self, t: i64, meds: OnMeds) -> (f64, f64) {
        let age = self.age(t);
        if age < 18.0 {
            let sys = 92.0 + 1.3 * age;
            return (sys, 55.0 + 0.8 * age);
        }
        let mut sys =
            self.sbp_base + 0.45 * (age - 30.0).max(0.0) + 0.6 * (self.bmi_adult(age) - 27.0);
        if let Some(y) = self.years_since(Chronic::Hypertension, t) {
            // Rising for three years before the onset, then established.
            sys += if y >= 0.0 {
                18.0 + 2.0 * y.min(4.0)
            } else {
                (18.0 * (1.0 + y / 3.0)).max(0.0)
            };
        }
        if meds.lisinopril {
            sys -= 11.0;
        }
        if meds.amlodipine {
            sys -= 8.0;
        }
        (sys, 0.55 * sys + self.dbp_offset)
    }

    pub(super) fn a1c(&self, t: i64, meds: OnMeds) -> f64 {
        let age = self.age(t);
        let mut v = self.a1c_base + 0.008 * (age - 30.0).max(0.0);
        if let Some(y) = self
            .years_since(Chronic::Prediabetes, t)
            .filter(|y| *y > -2.0)
        {
            v = v.max((5.7 + 0.12 * y).min(6.4));
        }
        if let Some(y) = self.years_since(Chronic::Diabetes, t).filter(|y| *y >= 0.0) {
            v = 6.6 + 0.22 * y;
        }
        if meds.metformin_since.is_some_and(|m| m <= t) {
            v -= 0.9;
        }
        v.clamp(4.2, 12.5)
    }

    pub(super) fn cholesterol(&self, t: i64, meds: OnMeds) -> f64 {
        let age = self.age(t);
        let mut v = self.chol_base + 0.7 * (age - 25.0).clamp(0.0, 40.0);
        if let Some(y) = self.years_since(Chronic::Hyperlipidemia, t) {
            v += 48.0 * (1.0 + y / 2.0).clamp(0.0, 1.0);
        }
        if meds.statin {
            v *= 0.72;
        }
        v
    }

    pub(super) fn creatinine(&self, t: i64) -> f64 {
        let age = self.age(t);
        if age < 12.0 {
            return 0.3 + 0.03 * age;
        }
        let dm_years = self
            .years_since(Chronic::Diabetes, t)
            .unwrap_or(0.0)
            .max(0.0);
        self.creat_base + 0.004 * (age - 40.0).max(0.0) + 0.015 * dm_years
    }

    pub(super) fn hemoglobin(&self, t: i64) -> f64 {
        if self.age(t) < 12.0 {
            12.2
        } else {
            self.hgb_base
        }
    }

    pub(super) fn heart_rate(&self, t: i64) -> f64 {
        let age = self.age(t);
        let base = match age {
            a if a < 1.0 => 130.0,
            a if a < 3.0 => 115.0,
            a if a < 6.0 => 100.0,
            a if a < 12.0 => 88.0,
            a if a < 18.0 => 78.0,
            _ => self.hr_base,
        };
        base + if self.smoking_at(t) == Smoking::Current {
            4.0
        } else {
            0.0
        }
    }

    pub(super) fn respiratory_rate(&self, t: i64) -> f64 {
        match self.age(t) {
            a if a < 1.0 => 34.0,
            a if a < 3.0 => 27.0,
            a if a < 6.0 => 22.0,
            a if a < 12.0 => 19.0,
            _ => 14.5,
        }
    }
}
