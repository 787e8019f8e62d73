//! The shared pool of Organizations and Practitioners patients are linked to.
//!
//! Entity `j` of each kind is drawn from its own stream, so its id does not
//! depend on the pool size. Practitioner `j` works at organization
//! `j % organizations`; every fourth organization (`j % 4 == 0`) is a hospital,
//! and organization `o` sends its emergencies and admissions to hospital
//! `o - o % 4`.

use super::codes::{
    self, FAMILY, FEMALE_GIVEN, MALE_GIVEN, NPI, SOURCE_ID, STREET_SUFFIXES, STREETS,
};
use crate::json::{push_coding, push_concept, push_decimal, push_str};
use crate::rng::{DOMAIN_ORGANIZATION, DOMAIN_PRACTITIONER, Stream};
use crate::time::push_instant_json;

/// An organization as patients see it.
pub(crate) struct Org {
    pub id: String,
    pub name: String,
    pub city: &'static codes::City,
}

/// A practitioner as patients see it.
pub(crate) struct Practitioner {
    pub id: String,
    /// "Dr. Given Family".
    pub display: String,
}

pub(crate) struct Pool {
    pub orgs: Vec<Org>,
    pub practitioners: Vec<Practitioner>,
    /// One NDJSON line per organization, in index order.
    pub org_lines: String,
    /// One NDJSON line per practitioner, in index order.
    pub practitioner_lines: String,
}

impl Pool {
    /// Pool sizes for a run: one organization per 200 patients and one
    /// practitioner per 50, at least 5 and at most 20,000 / 100,000 (the
    /// pool is held in memory). There are never fewer practitioners than
    /// organizations, so every organization has staff.
    pub(crate) fn sizes(patients: usize) -> (usize, usize) {
        (
            patients.div_ceil(200).clamp(5, 20_000),
            patients.div_ceil(50).clamp(5, 100_000),
        )
    }

    pub(crate) fn build(seed: u64, patients: usize, updated: i64) -> Pool {
        let (n_orgs, n_practitioners) = Self::sizes(patients);
        let mut org_lines = String::with_capacity(n_orgs * 900);
        let mut orgs = Vec::with_capacity(n_orgs);
        for j in 0..n_orgs {
            orgs.push(write_org(&mut org_lines, seed, j, updated));
        }
        let mut practitioner_lines = String::with_capacity(n_practitioners * 700);
        let practitioners = (0..n_practitioners)
            .map(|j| {
                write_practitioner(&mut practitioner_lines, seed, j, &orgs[j % n_orgs], updated)
            })
            .collect();
        Pool {
            orgs,
            practitioners,
            org_lines,
            practitioner_lines,
        }
    }

    /// The organization practitioner `p` works at.
    pub(crate) fn org_of(&self, p: usize) -> usize {
        p % self.orgs.len()
    }

    /// The hospital organization `org` refers patients to.
    pub(crate) fn hospital_of(org: usize) -> usize {
        org - org % 4
    }

    /// The `m`-th practitioner working at `org`, wrapping around the staff list.
    pub(crate) fn staff_member(&self, org: usize, m: usize) -> usize {
        let n = self.orgs.len();
        let staff = (self.practitioners.len() - org).div_ceil(n);
        org + (m % staff) * n
    }
}

fn push_meta(buf: &mut String, updated: i64) {
    buf.push_str(",\"meta\":{\"lastUpdated\":");
    push_instant_json(buf, updated);
    buf.push_str(",\"tag\":");
    buf.push_str(codes::HTEST_TAG);
    buf.push('}');
}

/// Appends an address object for a random street in `city`.
pub(crate) fn push_address(buf: &mut String, s: &mut Stream, city: &codes::City, with_geo: bool) {
    buf.push('{');
    if with_geo {
        buf.push_str(
            "\"extension\":[{\"url\":\"http://hl7.org/fhir/StructureDefinition/geolocation\",\"extension\":[{\"url\":\"latitude\",\"valueDecimal\":",
        );
        push_decimal(buf, city.lat + s.uniform(-0.08, 0.08), None);
        buf.push_str("},{\"url\":\"longitude\",\"valueDecimal\":");
        push_decimal(buf, city.lon + s.uniform(-0.08, 0.08), None);
        buf.push_str("}]}],");
    }
    buf.push_str("\"line\":[");
    let line = format!(
        "{} {} {}",
        s.int(1, 9999),
        s.pick(STREETS),
        s.pick(STREET_SUFFIXES)
    );
    push_str(buf, &line);
    if s.chance(0.15) {
        buf.push(',');
        push_str(buf, &format!("Unit {}", s.int(1, 400)));
    }
    buf.push_str("],\"city\":");
    push_str(buf, city.name);
    buf.push_str(",\"state\":");
    push_str(buf, city.state);
    buf.push_str(",\"postalCode\":\"");
    buf.push_str(city.zip3);
    buf.push_str(&s.digits(2));
    buf.push_str("\",\"country\":\"US\"}");
}

fn npi(s: &mut Stream) -> String {
    codes::npi_with_check_digit(&format!("{}{}", s.int(1, 3), s.digits(8)))
}

fn write_org(buf: &mut String, seed: u64, j: usize, updated: i64) -> Org {
    let mut s = Stream::new(seed, DOMAIN_ORGANIZATION, j as u64);
    let id = s.uuid();
    let city = codes::pick_city(&mut s);
    let name = if j.is_multiple_of(4) {
        match s.int(0, 3) {
            0 => format!("{} General Hospital", city.name),
            1 => format!("{} Medical Center", city.name),
            _ => format!("Saint {} Hospital", s.pick(MALE_GIVEN)),
        }
    } else {
        match s.int(0, 3) {
            0 => format!("{} Family Practice", s.pick(FAMILY)),
            1 => format!("{} Primary Care", city.name),
            _ => format!("{} Medical Group", s.pick(FAMILY)),
        }
    };
    buf.push_str("{\"resourceType\":\"Organization\",\"id\":\"");
    buf.push_str(&id);
    buf.push('"');
    push_meta(buf, updated);
    buf.push_str(",\"identifier\":[{\"system\":\"");
    buf.push_str(SOURCE_ID);
    buf.push_str("\",\"value\":\"");
    buf.push_str(&id);
    buf.push_str("\"},{\"system\":\"");
    buf.push_str(NPI);
    buf.push_str("\",\"value\":\"");
    buf.push_str(&npi(&mut s));
    buf.push_str("\"}],\"active\":true,\"type\":[");
    codes_prov(buf);
    buf.push_str("],\"name\":");
    push_str(buf, &name);
    buf.push_str(",\"telecom\":[{\"system\":\"phone\",\"value\":\"555-");
    buf.push_str(&s.digits(3));
    buf.push('-');
    buf.push_str(&s.digits(4));
    buf.push_str("\"}],\"address\":[");
    push_address(buf, &mut s, city, false);
    buf.push_str("]}\n");
    Org { id, name, city }
}

fn codes_prov(buf: &mut String) {
    buf.push_str("{\"coding\":[");
    push_coding(
        buf,
        "http://terminology.hl7.org/CodeSystem/organization-type",
        "prov",
        "Healthcare Provider",
    );
    buf.push_str("],\"text\":\"Healthcare Provider\"}");
}

fn write_practitioner(
    buf: &mut String,
    seed: u64,
    j: usize,
    org: &Org,
    updated: i64,
) -> Practitioner {
    let mut s = Stream::new(seed, DOMAIN_PRACTITIONER, j as u64);
    let id = s.uuid();
    let female = s.chance(0.5);
    let given = if female {
        s.pick(FEMALE_GIVEN)
    } else {
        s.pick(MALE_GIVEN)
    };
    let family = s.pick(FAMILY);
    let email_part = |x: &str| -> String {
        x.chars()
            .filter(char::is_ascii_alphanumeric)
            .map(|c| c.to_ascii_lowercase())
            .collect()
    };
    let email = format!(
        "{}.{}{}@example.com",
        email_part(given),
        email_part(family),
        j
    );
    buf.push_str("{\"resourceType\":\"Practitioner\",\"id\":\"");
    buf.push_str(&id);
    buf.push('"');
    push_meta(buf, updated);
    buf.push_str(",\"identifier\":[{\"system\":\"");
    buf.push_str(NPI);
    buf.push_str("\",\"value\":\"");
    buf.push_str(&npi(&mut s));
    buf.push_str("\"}],\"active\":true,\"name\":[{\"family\":");
    push_str(buf, family);
    buf.push_str(",\"given\":[");
    push_str(buf, given);
    buf.push_str("],\"prefix\":[\"Dr.\"]}],\"telecom\":[{\"system\":\"email\",\"value\":");
    push_str(buf, &email);
    buf.push_str(",\"use\":\"work\"}],\"address\":[");
    push_address(buf, &mut s, org.city, false);
    buf.push_str("],\"gender\":");
    buf.push_str(if female { "\"female\"" } else { "\"male\"" });
    buf.push_str(",\"qualification\":[{\"code\":");
    push_concept(
        buf,
        "http://terminology.hl7.org/CodeSystem/v2-0360",
        "MD",
        "Doctor of Medicine",
    );
    buf.push_str("}]}\n");
    Practitioner {
        id,
        display: format!("Dr. {given} {family}"),
    }
}
