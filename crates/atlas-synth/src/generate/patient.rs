//! One patient's resources: the Patient, then each planned encounter with
//! its observations, and finally the conditions and medication requests,
//! whose status is only known once the whole history is.
//!
//! A chronic condition is diagnosed at the first check-up after its onset
//! (see [`super::schedule`]), and diagnoses start medications that move the
//! labs back (metformin lowers A1c, lisinopril and amlodipine lower blood
//! pressure, simvastatin lowers cholesterol; see [`super::person`]).

use super::codes::{self as k, Category, Code, Measure};
use super::person::{CHRONIC, CHRONIC_COUNT, Chronic, OnMeds, Person, Smoking};
use super::pool::{self, Pool};
use super::schedule::{Acute, Kind, Plan, plan_encounters};
use super::{Bufs, CONDITION, ENCOUNTER, MEDICATION_REQUEST, OBSERVATION, PATIENT};
use crate::json::{push_coding, push_concept, push_decimal, push_int, push_reference, push_str};
use crate::rng::{DOMAIN_PATIENT, Stream};
use crate::time::{DAY, push_date_json, push_date_time_json, push_instant_json};

/// Share of quantities written with every digit of the computed double.
const FULL_PRECISION_SHARE: f64 = 0.08;

/// What every patient in a run shares.
pub(crate) struct Ctx<'a> {
    pub seed: u64,
    pub pool: &'a Pool,
    /// The end of every history, seconds since the epoch.
    pub end: i64,
}

/// Generates patient `index` into `out`.
pub(crate) fn write_patient(ctx: &Ctx<'_>, index: u64, out: &mut Bufs) {
    let mut s = Stream::new(ctx.seed, DOMAIN_PATIENT, index);
    let person = Person::sample(&mut s, ctx);
    let plans = plan_encounters(&mut s, &person);
    let mut sim = Sim {
        s,
        p: person,
        ctx,
        out,
        conditions: Vec::new(),
        meds: Vec::new(),
        courses: Vec::new(),
        chronic_cond: [None; CHRONIC_COUNT],
        obese_recorded: false,
        blood_typed: false,
    };
    sim.write_patient_resource();
    for plan in &plans {
        sim.encounter(plan);
    }
    sim.finish();
}

struct ConditionRec {
    id: String,
    code: Code,
    encounter: String,
    onset: i64,
    recorded: i64,
    abatement: Option<i64>,
}

#[derive(Clone, Copy)]
struct Dosage {
    text: &'static str,
    frequency: u32,
    period: u32,
    unit: &'static str,
    as_needed: bool,
    days: Option<u32>,
    /// Tablets, capsules or puffs per dose.
    amount: u32,
}

const fn dose(text: &'static str, frequency: u32, period: u32, unit: &'static str) -> Dosage {
    Dosage {
        text,
        frequency,
        period,
        unit,
        as_needed: false,
        days: None,
        amount: 1,
    }
}

const DAILY: Dosage = dose("Take 1 tablet by mouth once daily", 1, 1, "d");
const DAILY_EVENING: Dosage = dose(
    "Take 1 tablet by mouth once daily with the evening meal",
    1,
    1,
    "d",
);
const DAILY_BEDTIME: Dosage = dose("Take 1 tablet by mouth once daily at bedtime", 1, 1, "d");
const INHALER: Dosage = Dosage {
    as_needed: true,
    amount: 2,
    ..dose(
        "Inhale 2 puffs by mouth every 4 to 6 hours as needed for wheezing",
        1,
        4,
        "h",
    )
};
const AMOXICILLIN_COURSE: Dosage = Dosage {
    days: Some(10),
    ..dose(
        "Take 1 capsule by mouth three times daily for 10 days",
        3,
        1,
        "d",
    )
};
const TWICE_DAILY_COURSE: Dosage = Dosage {
    days: Some(10),
    ..dose("Take 1 tablet by mouth twice daily for 10 days", 2, 1, "d")
};
const PAIN_PRN: Dosage = Dosage {
    as_needed: true,
    amount: 2,
    days: Some(7),
    ..dose(
        "Take 2 tablets by mouth every 6 hours as needed for pain or fever",
        1,
        6,
        "h",
    )
};

struct MedRec {
    id: String,
    code: Code,
    encounter: String,
    authored: i64,
    requester: usize,
    reason: Option<usize>,
    dosage: Dosage,
    course: Option<usize>,
}

/// A chronic medication and its renewals.
struct Course {
    code: Code,
    dosage: Dosage,
    condition: Option<usize>,
    first_authored: i64,
    last: usize,
    last_authored: i64,
    stopped: bool,
}

/// The encounter being written.
struct Enc {
    id: String,
    start: i64,
    end: i64,
    practitioner: usize,
    ill: bool,
}

struct Sim<'a, 'b> {
    s: Stream,
    p: Person,
    ctx: &'a Ctx<'a>,
    out: &'b mut Bufs,
    conditions: Vec<ConditionRec>,
    meds: Vec<MedRec>,
    courses: Vec<Course>,
    /// The Condition recorded for each chronic condition.
    chronic_cond: [Option<usize>; CHRONIC_COUNT],
    obese_recorded: bool,
    blood_typed: bool,
}

fn push_meta(buf: &mut String, updated: i64) {
    buf.push_str(",\"meta\":{\"lastUpdated\":");
    push_instant_json(buf, updated);
    buf.push_str(",\"tag\":");
    buf.push_str(k::HTEST_TAG);
    buf.push('}');
}

fn push_head(buf: &mut String, ty: &str, id: &str, updated: i64) {
    buf.push_str("{\"resourceType\":\"");
    buf.push_str(ty);
    buf.push_str("\",\"id\":\"");
    buf.push_str(id);
    buf.push('"');
    push_meta(buf, updated);
}

fn push_quantity(buf: &mut String, value: f64, places: Option<usize>, unit: &str) {
    buf.push_str("{\"value\":");
    push_decimal(buf, value, places);
    buf.push_str(",\"unit\":\"");
    buf.push_str(unit);
    buf.push_str("\",\"system\":\"");
    buf.push_str(k::UCUM);
    buf.push_str("\",\"code\":\"");
    buf.push_str(unit);
    buf.push_str("\"}");
}

impl Sim<'_, '_> {
    fn end_line(&mut self, kind: usize) {
        self.out.text[kind].push('\n');
        self.out.counts[kind] += 1;
    }

    fn on_meds(&self, t: i64) -> OnMeds {
        let mut m = OnMeds::default();
        for c in &self.courses {
            let started = c.first_authored;
            if started > t || c.stopped {
                continue;
            }
            match c.code.code {
                code if code == k::MED_LISINOPRIL.code => m.lisinopril = true,
                code if code == k::MED_AMLODIPINE.code => m.amlodipine = true,
                code if code == k::MED_SIMVASTATIN.code => m.statin = true,
                code if code == k::MED_METFORMIN.code => m.metformin_since = Some(started),
                _ => {}
            }
        }
        m
    }

    /// Full precision now and then, otherwise `places` decimals.
    fn places(&mut self, places: usize) -> Option<usize> {
        (!self.s.chance(FULL_PRECISION_SHARE)).then_some(places)
    }

    // --- Patient ---------------------------------------------------------

    fn write_patient_resource(&mut self) {
        let pool = self.ctx.pool;
        let s = &mut self.s;
        let p = &self.p;
        let buf = &mut self.out.text[PATIENT];
        push_head(buf, "Patient", &p.id, p.hist_end);

        // US Core race, ethnicity and birth sex; mother's maiden name; birthplace.
        let race = k::weighted(k::RACES, s.unit());
        let hispanic = s.chance(0.18);
        let ethnicity = if hispanic {
            k::HISPANIC
        } else {
            k::NOT_HISPANIC
        };
        buf.push_str(",\"extension\":[");
        for (url, code) in [("race", race), ("ethnicity", ethnicity)] {
            buf.push_str("{\"url\":\"http://hl7.org/fhir/us/core/StructureDefinition/us-core-");
            buf.push_str(url);
            buf.push_str("\",\"extension\":[{\"url\":\"ombCategory\",\"valueCoding\":");
            push_coding(buf, k::OMB, code.code, code.display);
            buf.push_str("},{\"url\":\"text\",\"valueString\":");
            push_str(buf, code.display);
            buf.push_str("}]},");
        }
        buf.push_str("{\"url\":\"http://hl7.org/fhir/StructureDefinition/patient-mothersMaidenName\",\"valueString\":");
        push_str(
            buf,
            &format!("{} {}", s.pick(k::FEMALE_GIVEN), s.pick(k::FAMILY)),
        );
        buf.push_str("},{\"url\":\"http://hl7.org/fhir/us/core/StructureDefinition/us-core-birthsex\",\"valueCode\":");
        buf.push_str(if p.female { "\"F\"" } else { "\"M\"" });
        let birth_city = k::pick_city(s);
        buf.push_str("},{\"url\":\"http://hl7.org/fhir/StructureDefinition/patient-birthPlace\",\"valueAddress\":{\"city\":");
        push_str(buf, birth_city.name);
        buf.push_str(",\"state\":\"");
        buf.push_str(birth_city.state);
        buf.push_str("\",\"country\":\"US\"}}]");

        // Identifiers.
        let age_now = p.age(p.hist_end);
        buf.push_str(",\"identifier\":[{\"system\":\"");
        buf.push_str(k::SOURCE_ID);
        buf.push_str("\",\"value\":\"");
        buf.push_str(&p.id);
        buf.push_str("\"},{\"type\":");
        push_concept(
            buf,
            "http://terminology.hl7.org/CodeSystem/v2-0203",
            "MR",
            "Medical Record Number",
        );
        buf.push_str(",\"system\":\"");
        buf.push_str(k::MRN);
        buf.push_str("\",\"value\":\"MRN");
        buf.push_str(&s.digits(9));
        buf.push_str("\"},{\"type\":");
        push_concept(
            buf,
            "http://terminology.hl7.org/CodeSystem/v2-0203",
            "SS",
            "Social Security Number",
        );
        buf.push_str(",\"system\":\"");
        buf.push_str(k::SSN);
        buf.push_str("\",\"value\":\"999-");
        buf.push_str(&s.digits(2));
        buf.push('-');
        buf.push_str(&s.digits(4));
        buf.push_str("\"}");
        if age_now >= 16.0 && s.chance(0.85) {
            buf.push_str(",{\"type\":");
            push_concept(
                buf,
                "http://terminology.hl7.org/CodeSystem/v2-0203",
                "DL",
                "Driver's license number",
            );
            buf.push_str(",\"system\":\"urn:oid:2.16.840.1.113883.4.3.25\",\"value\":\"S99");
            buf.push_str(&s.digits(6));
            buf.push_str("\"}");
        }
        if age_now >= 18.0 && s.chance(0.3) {
            buf.push_str(",{\"type\":");
            push_concept(
                buf,
                "http://terminology.hl7.org/CodeSystem/v2-0203",
                "PPN",
                "Passport Number",
            );
            buf.push_str(",\"system\":\"http://standardhealthrecord.org/fhir/StructureDefinition/passportNumber\",\"value\":\"X");
            buf.push_str(&s.digits(8));
            buf.push_str("X\"}");
        }
        buf.push(']');

        // Name(s).
        let married = age_now >= 20.0 && s.chance(((age_now - 20.0) / 20.0).min(0.6));
        buf.push_str(",\"name\":[{\"use\":\"official\",\"family\":");
        push_str(buf, p.family);
        buf.push_str(",\"given\":[");
        for (i, g) in p.given.iter().enumerate() {
            if i > 0 {
                buf.push(',');
            }
            push_str(buf, g);
        }
        buf.push(']');
        if age_now >= 18.0 && s.chance(0.7) {
            let prefix = match (p.female, married) {
                (false, _) => "Mr.",
                (true, true) => "Mrs.",
                (true, false) => "Ms.",
            };
            buf.push_str(",\"prefix\":[\"");
            buf.push_str(prefix);
            buf.push_str("\"]");
        }
        buf.push('}');
        if p.female && married && s.chance(0.5) {
            buf.push_str(",{\"use\":\"maiden\",\"family\":");
            push_str(buf, s.pick(k::FAMILY));
            buf.push_str(",\"given\":[");
            push_str(buf, p.given[0]);
            buf.push_str("]}");
        }
        buf.push(']');

        // Telecom.
        buf.push_str(",\"telecom\":[{\"system\":\"phone\",\"value\":\"555-");
        buf.push_str(&s.digits(3));
        buf.push('-');
        buf.push_str(&s.digits(4));
        buf.push_str("\",\"use\":\"home\"}");
        if age_now >= 16.0 && s.chance(0.6) {
            let local: String = p.given[0]
                .chars()
                .chain(std::iter::once('.'))
                .chain(p.family.chars())
                .filter(|c| c.is_ascii_alphanumeric() || *c == '.')
                .map(|c| c.to_ascii_lowercase())
                .collect();
            buf.push_str(",{\"system\":\"email\",\"value\":");
            push_str(buf, &format!("{local}{}@example.org", s.int(1, 1000)));
            buf.push_str(",\"use\":\"home\"}");
        }
        buf.push(']');

        buf.push_str(",\"gender\":");
        buf.push_str(if p.female { "\"female\"" } else { "\"male\"" });
        buf.push_str(",\"birthDate\":");
        push_date_json(buf, p.birth_day);
        if let Some(death) = p.death {
            buf.push_str(",\"deceasedDateTime\":");
            push_date_time_json(buf, death);
        }

        // Address: mostly near the practice.
        let city = if s.chance(0.8) {
            pool.orgs[p.org].city
        } else {
            k::pick_city(s)
        };
        buf.push_str(",\"address\":[");
        pool::push_address(buf, s, city, true);
        buf.push(']');

        let marital = if age_now < 18.0 {
            k::MARITAL[1]
        } else if married {
            if age_now > 70.0 && s.chance(0.3) {
                k::MARITAL[3]
            } else {
                k::MARITAL[0]
            }
        } else if age_now > 30.0 && s.chance(0.25) {
            k::MARITAL[2]
        } else {
            k::MARITAL[1]
        };
        buf.push_str(",\"maritalStatus\":");
        push_concept(
            buf,
            "http://terminology.hl7.org/CodeSystem/v3-MaritalStatus",
            marital.code,
            marital.display,
        );
        if s.chance(0.03) {
            buf.push_str(",\"multipleBirthInteger\":");
            push_int(buf, s.int(1, 3));
        } else {
            buf.push_str(",\"multipleBirthBoolean\":false");
        }
        let (lang, lang_display) = if hispanic && s.chance(0.4) {
            ("es", "Spanish")
        } else {
            ("en-US", "English (United States)")
        };
        buf.push_str(",\"communication\":[{\"language\":");
        push_concept(buf, "urn:ietf:bcp:47", lang, lang_display);
        buf.push_str("}],\"generalPractitioner\":[");
        let gp = &pool.practitioners[p.gp];
        push_reference(buf, "Practitioner", &gp.id, &gp.display);
        buf.push_str("],\"managingOrganization\":");
        let org = &pool.orgs[p.org];
        push_reference(buf, "Organization", &org.id, &org.name);
        buf.push('}');
        self.end_line(PATIENT);
    }

    // --- Encounters ------------------------------------------------------

    fn encounter(&mut self, plan: &Plan) {
        let s = &mut self.s;
        let p = &self.p;
        let (class, class_display, ty, minutes) = match plan.kind {
            Kind::Wellness => {
                let ty = if p.age(plan.day * DAY) < 18.0 {
                    k::ENC_WELL_CHILD
                } else if s.chance(0.5) {
                    k::ENC_GENERAL_EXAM
                } else {
                    k::ENC_CHECK_UP
                };
                ("AMB", "ambulatory", ty, s.int(20, 46))
            }
            Kind::FollowUp => ("AMB", "ambulatory", k::ENC_FOLLOW_UP, s.int(15, 31)),
            Kind::Symptom(_) => ("AMB", "ambulatory", k::ENC_SYMPTOM, s.int(15, 41)),
            Kind::Emergency(_) => ("EMER", "emergency", k::ENC_ER, s.int(90, 480)),
            Kind::Inpatient(_) => (
                "IMP",
                "inpatient encounter",
                k::ENC_ADMISSION,
                s.int(1, 7) * 1440,
            ),
        };
        let ambulatory = class == "AMB";
        let time_of_day = if ambulatory {
            8 * 3600 + 300 * s.int(0, 108)
        } else {
            s.int(0, DAY)
        };
        let start = (plan.day * DAY + time_of_day).max(p.birth + 3600);
        let end = (start + minutes * 60).min(p.hist_end);
        if end <= start {
            return;
        }
        let (org, practitioner) = if ambulatory {
            let gp = p.gp;
            let who = if s.chance(0.85) {
                gp
            } else {
                self.ctx.pool.staff_member(p.org, s.index(8))
            };
            (p.org, who)
        } else {
            (
                p.hospital,
                self.ctx.pool.staff_member(p.hospital, s.index(64)),
            )
        };
        let enc = Enc {
            id: s.uuid(),
            start,
            end,
            practitioner,
            ill: !matches!(plan.kind, Kind::Wellness | Kind::FollowUp),
        };

        // Reasons: the acute illness, or the chronic conditions followed up.
        let mut reasons: Vec<Code> = Vec::new();
        match plan.kind {
            Kind::Symptom(a) | Kind::Emergency(a) | Kind::Inpatient(a) => reasons.push(a.code()),
            Kind::FollowUp => {
                for c in CHRONIC {
                    if let Some(ci) = self.chronic_cond[c as usize] {
                        let cond = &self.conditions[ci];
                        if cond.abatement.is_none_or(|a| a > start) {
                            reasons.push(cond.code);
                        }
                    }
                }
            }
            Kind::Wellness => {}
        }

        let pool = self.ctx.pool;
        let buf = &mut self.out.text[ENCOUNTER];
        push_head(buf, "Encounter", &enc.id, end);
        buf.push_str(",\"status\":\"finished\",\"class\":");
        push_coding(buf, k::ACT_CODE, class, class_display);
        buf.push_str(",\"type\":[");
        push_concept(buf, k::SNOMED, ty.code, ty.display);
        buf.push_str("],\"subject\":");
        push_reference(buf, "Patient", &p.id, "");
        buf.push_str(",\"participant\":[{\"type\":[");
        push_concept(
            buf,
            "http://terminology.hl7.org/CodeSystem/v3-ParticipationType",
            "PPRF",
            "primary performer",
        );
        buf.push_str("],\"period\":");
        push_period(buf, start, end);
        buf.push_str(",\"individual\":");
        let doc = &pool.practitioners[practitioner];
        push_reference(buf, "Practitioner", &doc.id, &doc.display);
        buf.push_str("}],\"period\":");
        push_period(buf, start, end);
        if !reasons.is_empty() {
            buf.push_str(",\"reasonCode\":[");
            for (i, r) in reasons.iter().enumerate() {
                if i > 0 {
                    buf.push(',');
                }
                push_concept(buf, k::SNOMED, r.code, r.display);
            }
            buf.push(']');
        }
        if class == "IMP" {
            let (code, display) = if p.death == Some(end) {
                ("20", "Expired")
            } else {
                ("01", "Discharged to home or self care")
            };
            buf.push_str(",\"hospitalization\":{\"dischargeDisposition\":");
            push_concept(buf, "http://www.nubc.org/patient-discharge", code, display);
            buf.push('}');
        }
        buf.push_str(",\"serviceProvider\":");
        let o = &pool.orgs[org];
        push_reference(buf, "Organization", &o.id, &o.name);
        buf.push('}');
        self.end_line(ENCOUNTER);

        // Diagnoses and treatment come first so that the labs see the medication.
        match plan.kind {
            Kind::Wellness => {
                self.diagnose_chronic(plan.diagnoses, &enc);
                self.vitals(&enc, true);
                self.wellness_labs(&enc);
                self.renew_courses(&enc);
            }
            Kind::FollowUp => {
                self.vitals(&enc, false);
                self.follow_up_labs(&enc);
                self.renew_courses(&enc);
            }
            Kind::Symptom(a) | Kind::Emergency(a) => {
                self.acute(a, &enc);
                self.vitals(&enc, false);
                if !ambulatory {
                    self.narrative(a, &enc);
                }
            }
            Kind::Inpatient(a) => {
                self.acute(a, &enc);
                self.vitals(&enc, false);
                self.narrative(a, &enc);
                self.inpatient_labs(&enc);
            }
        }
    }

    fn diagnose_chronic(&mut self, bits: u8, enc: &Enc) {
        for c in CHRONIC {
            if bits & c.bit() == 0 {
                continue;
            }
            let onset = self.p.onset[c as usize]
                .unwrap_or(enc.start)
                .clamp(self.p.birth, enc.start);
            let code = match c {
                Chronic::Hypertension => self.p.htn_code,
                Chronic::Hyperlipidemia => k::COND_HYPERLIPIDEMIA,
                Chronic::Prediabetes => k::COND_PREDIABETES,
                Chronic::Diabetes => k::COND_DIABETES,
                Chronic::Asthma => k::COND_ASTHMA,
            };
            let ci = self.add_condition(code, enc, onset, None);
            self.chronic_cond[c as usize] = Some(ci);
            match c {
                Chronic::Hypertension => {
                    self.start_course(k::MED_LISINOPRIL, DAILY, Some(ci), enc);
                    if self.s.chance(0.3) {
                        self.start_course(k::MED_AMLODIPINE, DAILY, Some(ci), enc);
                    }
                }
                Chronic::Hyperlipidemia => {
                    if self.s.chance(0.8) {
                        self.start_course(k::MED_SIMVASTATIN, DAILY_BEDTIME, Some(ci), enc);
                    }
                }
                Chronic::Diabetes => {
                    // Prediabetes turns into diabetes.
                    if let Some(pre) = self.chronic_cond[Chronic::Prediabetes as usize] {
                        self.conditions[pre].abatement = Some(enc.start);
                    }
                    self.start_course(k::MED_METFORMIN, DAILY_EVENING, Some(ci), enc);
                }
                Chronic::Asthma => self.start_course(k::MED_ALBUTEROL, INHALER, Some(ci), enc),
                Chronic::Prediabetes => {}
            }
        }
    }

    fn add_condition(
        &mut self,
        code: Code,
        enc: &Enc,
        onset: i64,
        abatement: Option<i64>,
    ) -> usize {
        self.conditions.push(ConditionRec {
            id: self.s.uuid(),
            code,
            encounter: enc.id.clone(),
            onset,
            recorded: enc.start,
            abatement,
        });
        self.conditions.len() - 1
    }

    fn acute(&mut self, a: Acute, enc: &Enc) {
        if a == Acute::AsthmaAttack {
            let ci = self.chronic_cond[Chronic::Asthma as usize];
            self.prescribe(k::MED_ALBUTEROL, INHALER, ci, enc, None);
            return;
        }
        let onset = (enc.start - self.s.int(1, 5) * DAY).max(self.p.birth);
        let (lo, hi) = a.days();
        let abatement = enc.end + self.s.int(lo, hi + 1) * DAY;
        let ci = self.add_condition(a.code(), enc, onset, Some(abatement));
        let med = match a {
            Acute::Strep => Some(if self.s.chance(0.5) {
                (k::MED_PENICILLIN, TWICE_DAILY_COURSE)
            } else {
                (k::MED_AMOXICILLIN, AMOXICILLIN_COURSE)
            }),
            Acute::Otitis => self
                .s
                .chance(0.7)
                .then_some((k::MED_AMOXICILLIN, AMOXICILLIN_COURSE)),
            Acute::Sinusitis => self
                .s
                .chance(0.2)
                .then_some((k::MED_AMOXICILLIN, AMOXICILLIN_COURSE)),
            Acute::Pneumonia => Some((k::MED_AMOX_CLAV, TWICE_DAILY_COURSE)),
            Acute::Bronchitis | Acute::Pharyngitis => self
                .s
                .chance(0.45)
                .then_some((k::MED_ACETAMINOPHEN, PAIN_PRN)),
            Acute::AsthmaAttack => None,
        };
        if let Some((code, dosage)) = med {
            self.prescribe(code, dosage, Some(ci), enc, None);
        }
    }

    fn prescribe(
        &mut self,
        code: Code,
        dosage: Dosage,
        reason: Option<usize>,
        enc: &Enc,
        course: Option<usize>,
    ) -> usize {
        let authored = enc.start + self.s.int(60, 600).min(enc.end - enc.start);
        self.meds.push(MedRec {
            id: self.s.uuid(),
            code,
            encounter: enc.id.clone(),
            authored,
            requester: enc.practitioner,
            reason,
            dosage,
            course,
        });
        self.meds.len() - 1
    }

    fn start_course(&mut self, code: Code, dosage: Dosage, condition: Option<usize>, enc: &Enc) {
        let course = self.courses.len();
        let first = self.prescribe(code, dosage, condition, enc, Some(course));
        let authored = self.meds[first].authored;
        self.courses.push(Course {
            code,
            dosage,
            condition,
            first_authored: authored,
            last: first,
            last_authored: authored,
            stopped: false,
        });
    }

    /// Yearly renewal of chronic medications; now and then one is stopped.
    fn renew_courses(&mut self, enc: &Enc) {
        for ci in 0..self.courses.len() {
            let c = &self.courses[ci];
            if c.stopped || enc.start - c.last_authored < 300 * DAY {
                continue;
            }
            if self.s.chance(0.04) {
                self.courses[ci].stopped = true;
                continue;
            }
            let (code, dosage, condition) = (c.code, c.dosage, c.condition);
            let m = self.prescribe(code, dosage, condition, enc, Some(ci));
            let authored = self.meds[m].authored;
            let c = &mut self.courses[ci];
            c.last = m;
            c.last_authored = authored;
        }
    }

    // --- Observations ----------------------------------------------------

    /// A time inside the encounter, `min_offset`..`max_offset` seconds after its start.
    fn during(&mut self, enc: &Enc, min_offset: i64, max_offset: i64) -> i64 {
        (enc.start + self.s.int(min_offset, max_offset + 1)).min(enc.end)
    }

    fn obs_head(&mut self, enc: &Enc, m: &Measure, effective: i64, issued: i64) {
        let id = self.s.uuid();
        let buf = &mut self.out.text[OBSERVATION];
        push_head(buf, "Observation", &id, issued);
        buf.push_str(",\"status\":\"final\",\"category\":[{\"coding\":[");
        let cat = m.category.code();
        push_coding(buf, k::OBS_CATEGORY, cat.code, cat.display);
        buf.push_str("]}],\"code\":");
        push_concept(buf, k::LOINC, m.code.code, m.code.display);
        buf.push_str(",\"subject\":");
        push_reference(buf, "Patient", &self.p.id, "");
        buf.push_str(",\"encounter\":");
        push_reference(buf, "Encounter", &enc.id, "");
        buf.push_str(",\"effectiveDateTime\":");
        push_date_time_json(buf, effective);
        buf.push_str(",\"issued\":");
        push_instant_json(buf, issued);
    }

    fn quantity(&mut self, enc: &Enc, m: &Measure, value: f64, places: usize, effective: i64) {
        let issued = self.issued(m, effective);
        let places = self.places(places);
        self.obs_head(enc, m, effective, issued);
        let buf = &mut self.out.text[OBSERVATION];
        buf.push_str(",\"valueQuantity\":");
        push_quantity(buf, value, places, m.unit);
        buf.push('}');
        self.end_line(OBSERVATION);
    }

    fn issued(&mut self, m: &Measure, effective: i64) -> i64 {
        let lag = if m.category == Category::Laboratory {
            self.s.int(1800, 4 * 3600)
        } else {
            0
        };
        (effective + lag).min(self.p.hist_end).max(effective)
    }

    fn vitals(&mut self, enc: &Enc, full: bool) {
        let t = self.during(enc, 0, 600);
        let p_age = self.p.age(t);
        let meds = self.on_meds(t);
        if full {
            let h = self.p.height(t) + self.s.normal(0.0, 0.4);
            let w = self.p.weight(t) * (1.0 + self.s.normal(0.0, 0.012));
            self.quantity(enc, &k::OBS_HEIGHT, h, 1, t);
            self.quantity(enc, &k::OBS_WEIGHT, w, 1, t);
            if p_age >= 2.0 {
                let hm = h / 100.0;
                self.quantity(enc, &k::OBS_BMI, w / (hm * hm), 1, t);
            }
        } else if p_age >= 18.0 && !enc.ill {
            let w = self.p.weight(t) * (1.0 + self.s.normal(0.0, 0.012));
            self.quantity(enc, &k::OBS_WEIGHT, w, 1, t);
        }
        if enc.ill {
            let fever = self.s.chance(0.55);
            let temp = if fever {
                self.s.uniform(37.8, 39.6)
            } else {
                self.s.normal(36.8, 0.2)
            };
            self.quantity(enc, &k::OBS_TEMPERATURE, temp, 1, t);
        }
        if p_age >= 3.0 {
            let (sys, dia) = self.p.blood_pressure(t, meds);
            let sys = (sys + self.s.normal(0.0, 6.0)).round();
            let dia = (dia + self.s.normal(0.0, 4.0)).round().min(sys - 20.0);
            self.blood_pressure(enc, sys, dia, t);
        }
        let ill_bump = if enc.ill { 14.0 } else { 0.0 };
        let hr = (self.p.heart_rate(t) + ill_bump + self.s.normal(0.0, 5.0)).round();
        self.quantity(enc, &k::OBS_HEART_RATE, hr, 0, t);
        let rr = (self.p.respiratory_rate(t) + ill_bump / 5.0 + self.s.normal(0.0, 1.5)).round();
        self.quantity(enc, &k::OBS_RESP_RATE, rr, 0, t);
        if full && p_age >= 15.0 {
            let answer = match self.p.smoking_at(t) {
                Smoking::Never => k::SMOKING_NEVER,
                Smoking::Former => k::SMOKING_FORMER,
                Smoking::Current => k::SMOKING_CURRENT,
            };
            self.obs_head(enc, &k::OBS_SMOKING, t, t);
            let buf = &mut self.out.text[OBSERVATION];
            buf.push_str(",\"valueCodeableConcept\":");
            push_concept(buf, k::SNOMED, answer.code, answer.display);
            buf.push('}');
            self.end_line(OBSERVATION);
        }
    }

    fn blood_pressure(&mut self, enc: &Enc, sys: f64, dia: f64, t: i64) {
        self.obs_head(enc, &k::OBS_BP_PANEL, t, t);
        let buf = &mut self.out.text[OBSERVATION];
        buf.push_str(",\"component\":[");
        for (i, (code, v)) in [(k::OBS_DIASTOLIC, dia), (k::OBS_SYSTOLIC, sys)]
            .into_iter()
            .enumerate()
        {
            if i > 0 {
                buf.push(',');
            }
            buf.push_str("{\"code\":");
            push_concept(buf, k::LOINC, code.code, code.display);
            buf.push_str(",\"valueQuantity\":");
            push_quantity(buf, v, Some(0), "mm[Hg]");
            buf.push('}');
        }
        buf.push_str("]}");
        self.end_line(OBSERVATION);
    }

    fn a1c_and_glucose(&mut self, enc: &Enc, t: i64, with_a1c: bool) {
        let meds = self.on_meds(t);
        let a1c = self.p.a1c(t, meds) + self.s.normal(0.0, 0.12);
        if with_a1c {
            self.quantity(enc, &k::OBS_A1C, a1c, 1, t);
        }
        // Fasting glucose: ADAG's estimated average (28.7 × A1c − 46.7), a little lower.
        let glucose = (28.7 * a1c - 58.0 + self.s.normal(0.0, 9.0)).clamp(55.0, 450.0);
        self.quantity(enc, &k::OBS_GLUCOSE, glucose, 1, t);
    }

    fn diagnosed(&self, c: Chronic) -> bool {
        self.chronic_cond[c as usize].is_some()
    }

    fn wellness_labs(&mut self, enc: &Enc) {
        let t = self.during(enc, 600, 1200);
        let age = self.p.age(t);
        if age < 18.0 || !(age >= 35.0 || self.s.chance(0.3)) {
            return;
        }
        let meds = self.on_meds(t);
        let chol = self.p.cholesterol(t, meds) + self.s.normal(0.0, 8.0);
        self.quantity(enc, &k::OBS_CHOLESTEROL, chol, 1, t);
        let glycemic = self.diagnosed(Chronic::Diabetes) || self.diagnosed(Chronic::Prediabetes);
        let a1c = glycemic || (age >= 45.0 && self.s.chance(0.3));
        self.a1c_and_glucose(enc, t, a1c);
        let creat = self.p.creatinine(t) + self.s.normal(0.0, 0.05);
        self.quantity(enc, &k::OBS_CREATININE, creat, 2, t);
        if self.s.chance(0.4) {
            let hgb = self.p.hemoglobin(t) + self.s.normal(0.0, 0.35);
            self.quantity(enc, &k::OBS_HEMOGLOBIN, hgb, 1, t);
        }
        if !self.blood_typed {
            self.blood_type(enc, t);
        }
        // Obesity is recorded the first time an adult's BMI is 30 or more.
        if !self.obese_recorded && age >= 18.0 && self.p.bmi_adult(age) >= 30.0 {
            self.obese_recorded = true;
            self.add_condition(k::COND_OBESITY, enc, enc.start, None);
        }
    }

    fn follow_up_labs(&mut self, enc: &Enc) {
        let t = self.during(enc, 300, 900);
        if self.diagnosed(Chronic::Diabetes)
            || (self.diagnosed(Chronic::Prediabetes) && self.s.chance(0.5))
        {
            self.a1c_and_glucose(enc, t, true);
        }
        if self.diagnosed(Chronic::Hyperlipidemia) && self.s.chance(0.5) {
            let meds = self.on_meds(t);
            let chol = self.p.cholesterol(t, meds) + self.s.normal(0.0, 8.0);
            self.quantity(enc, &k::OBS_CHOLESTEROL, chol, 1, t);
        }
        if self.diagnosed(Chronic::Hypertension) && self.s.chance(0.4) {
            let creat = self.p.creatinine(t) + self.s.normal(0.0, 0.05);
            self.quantity(enc, &k::OBS_CREATININE, creat, 2, t);
        }
    }

    fn inpatient_labs(&mut self, enc: &Enc) {
        let t = self.during(enc, 1800, 4 * 3600);
        let hgb = self.p.hemoglobin(t) - 0.6 + self.s.normal(0.0, 0.5);
        self.quantity(enc, &k::OBS_HEMOGLOBIN, hgb, 1, t);
        let creat = self.p.creatinine(t) * 1.1 + self.s.normal(0.0, 0.08);
        self.quantity(enc, &k::OBS_CREATININE, creat, 2, t);
        self.a1c_and_glucose(enc, t, self.diagnosed(Chronic::Diabetes));
        if !self.blood_typed {
            self.blood_type(enc, t);
        }
    }

    fn blood_type(&mut self, enc: &Enc, t: i64) {
        self.blood_typed = true;
        let issued = self.issued(&k::OBS_BLOOD_TYPE, t);
        let value = k::weighted(k::BLOOD_TYPES, self.s.unit());
        self.obs_head(enc, &k::OBS_BLOOD_TYPE, t, issued);
        let buf = &mut self.out.text[OBSERVATION];
        buf.push_str(",\"valueString\":");
        push_str(buf, value);
        buf.push('}');
        self.end_line(OBSERVATION);
    }

    fn narrative(&mut self, a: Acute, enc: &Enc) {
        let t = self.during(enc, 0, 300);
        let days = self.s.int(1, 6);
        let text = match self.s.int(0, 3) {
            0 => format!("Patient presents with {} for {days} days.", a.complaint()),
            1 => format!(
                "Patient states \"it started {days} days ago\" and reports {}. No known drug allergies.",
                a.complaint()
            ),
            _ => format!(
                "{days}-day history of {}.\nVitals reviewed; see flowsheet.",
                a.complaint()
            ),
        };
        self.obs_head(enc, &k::OBS_HPI, t, t);
        let buf = &mut self.out.text[OBSERVATION];
        buf.push_str(",\"valueString\":");
        push_str(buf, &text);
        buf.push('}');
        self.end_line(OBSERVATION);
    }

    // --- Conditions and medication requests, once the history is known --

    fn finish(&mut self) {
        let end = self.p.hist_end;
        let deceased = self.p.death.is_some();
        for c in &self.conditions {
            let resolved = c.abatement.filter(|&a| a <= end);
            let buf = &mut self.out.text[CONDITION];
            push_head(buf, "Condition", &c.id, resolved.unwrap_or(c.recorded));
            buf.push_str(",\"clinicalStatus\":{\"coding\":[");
            let status = if resolved.is_some() {
                "resolved"
            } else {
                "active"
            };
            push_coding(
                buf,
                "http://terminology.hl7.org/CodeSystem/condition-clinical",
                status,
                "",
            );
            buf.push_str("]},\"verificationStatus\":{\"coding\":[");
            push_coding(
                buf,
                "http://terminology.hl7.org/CodeSystem/condition-ver-status",
                "confirmed",
                "",
            );
            buf.push_str("]},\"category\":[{\"coding\":[");
            push_coding(
                buf,
                "http://terminology.hl7.org/CodeSystem/condition-category",
                "encounter-diagnosis",
                "Encounter Diagnosis",
            );
            buf.push_str("]}],\"code\":");
            push_concept(buf, k::SNOMED, c.code.code, c.code.display);
            buf.push_str(",\"subject\":");
            push_reference(buf, "Patient", &self.p.id, "");
            buf.push_str(",\"encounter\":");
            push_reference(buf, "Encounter", &c.encounter, "");
            buf.push_str(",\"onsetDateTime\":");
            push_date_time_json(buf, c.onset);
            if let Some(a) = resolved {
                buf.push_str(",\"abatementDateTime\":");
                push_date_time_json(buf, a);
            }
            buf.push_str(",\"recordedDate\":");
            push_date_time_json(buf, c.recorded);
            buf.push('}');
            self.out.text[CONDITION].push('\n');
            self.out.counts[CONDITION] += 1;
        }

        for (mi, m) in self.meds.iter().enumerate() {
            let status = match m.course.map(|ci| &self.courses[ci]) {
                Some(course) if course.last != mi => "completed",
                Some(course) if course.stopped || deceased => "stopped",
                Some(_) => "active",
                None => {
                    let over = m.authored + i64::from(m.dosage.days.unwrap_or(0)) * DAY;
                    if over <= end {
                        "completed"
                    } else if deceased {
                        "stopped"
                    } else {
                        "active"
                    }
                }
            };
            let with_reason = m.reason.filter(|_| self.s.chance(0.8));
            let pool = self.ctx.pool;
            let buf = &mut self.out.text[MEDICATION_REQUEST];
            push_head(buf, "MedicationRequest", &m.id, m.authored);
            buf.push_str(",\"status\":\"");
            buf.push_str(status);
            buf.push_str("\",\"intent\":\"order\",\"medicationCodeableConcept\":");
            push_concept(buf, k::RXNORM, m.code.code, m.code.display);
            buf.push_str(",\"subject\":");
            push_reference(buf, "Patient", &self.p.id, "");
            buf.push_str(",\"encounter\":");
            push_reference(buf, "Encounter", &m.encounter, "");
            buf.push_str(",\"authoredOn\":");
            push_date_time_json(buf, m.authored);
            buf.push_str(",\"requester\":");
            let doc = &pool.practitioners[m.requester];
            push_reference(buf, "Practitioner", &doc.id, &doc.display);
            if let Some(ci) = with_reason {
                buf.push_str(",\"reasonReference\":[");
                push_reference(
                    buf,
                    "Condition",
                    &self.conditions[ci].id,
                    self.conditions[ci].code.display,
                );
                buf.push(']');
            }
            push_dosage(buf, &m.dosage);
            buf.push('}');
            self.out.text[MEDICATION_REQUEST].push('\n');
            self.out.counts[MEDICATION_REQUEST] += 1;
        }
    }
}

fn push_period(buf: &mut String, start: i64, end: i64) {
    buf.push_str("{\"start\":");
    push_date_time_json(buf, start);
    buf.push_str(",\"end\":");
    push_date_time_json(buf, end);
    buf.push('}');
}

fn push_dosage(buf: &mut String, d: &Dosage) {
    buf.push_str(",\"dosageInstruction\":[{\"sequence\":1,\"text\":");
    push_str(buf, d.text);
    buf.push_str(",\"timing\":{\"repeat\":{");
    if let Some(days) = d.days {
        buf.push_str("\"boundsDuration\":{\"value\":");
        push_int(buf, i64::from(days));
        buf.push_str(
            ",\"unit\":\"days\",\"system\":\"http://unitsofmeasure.org\",\"code\":\"d\"},",
        );
    }
    buf.push_str("\"frequency\":");
    push_int(buf, i64::from(d.frequency));
    buf.push_str(",\"period\":");
    push_int(buf, i64::from(d.period));
    buf.push_str(",\"periodUnit\":\"");
    buf.push_str(d.unit);
    buf.push_str("\"}},\"asNeededBoolean\":");
    buf.push_str(if d.as_needed { "true" } else { "false" });
    buf.push_str(",\"doseAndRate\":[{\"type\":{\"coding\":[");
    push_coding(
        buf,
        "http://terminology.hl7.org/CodeSystem/dose-rate-type",
        "ordered",
        "Ordered",
    );
    buf.push_str("]},\"doseQuantity\":{\"value\":");
    push_int(buf, i64::from(d.amount));
    buf.push_str("}}]}]");
}
