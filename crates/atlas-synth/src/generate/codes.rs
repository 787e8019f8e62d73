//! Code systems, codes and the name/place tables the generator draws from.
//!
//! Every string here is plain text without quotes or backslashes; names may
//! contain non-ASCII letters and apostrophes so that escaping and UTF-8 get
//! exercised downstream.

pub(crate) const SNOMED: &str = "http://snomed.info/sct";
pub(crate) const LOINC: &str = "http://loinc.org";
pub(crate) const RXNORM: &str = "http://www.nlm.nih.gov/research/umls/rxnorm";
pub(crate) const UCUM: &str = "http://unitsofmeasure.org";
pub(crate) const ACT_CODE: &str = "http://terminology.hl7.org/CodeSystem/v3-ActCode";
pub(crate) const OBS_CATEGORY: &str = "http://terminology.hl7.org/CodeSystem/observation-category";
pub(crate) const OMB: &str = "urn:oid:2.16.840.1.113883.6.238";
pub(crate) const NPI: &str = "http://hl7.org/fhir/sid/us-npi";
pub(crate) const SSN: &str = "http://hl7.org/fhir/sid/us-ssn";
pub(crate) const MRN: &str = "https://atlas.example/mrn";
pub(crate) const SOURCE_ID: &str = "https://atlas.example/synth";

/// `meta.tag` of every generated resource: HL7's "test health data".
pub(crate) const HTEST_TAG: &str = r#"[{"system":"http://terminology.hl7.org/CodeSystem/v3-ActReason","code":"HTEST","display":"test health data"}]"#;

/// A code from a code system with its display.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Code {
    pub code: &'static str,
    pub display: &'static str,
}

const fn c(code: &'static str, display: &'static str) -> Code {
    Code { code, display }
}

// --- Encounter types (SNOMED) ---
pub(crate) const ENC_WELL_CHILD: Code = c("410620009", "Well child visit (procedure)");
pub(crate) const ENC_GENERAL_EXAM: Code =
    c("162673000", "General examination of patient (procedure)");
pub(crate) const ENC_CHECK_UP: Code = c("185349003", "Encounter for check up (procedure)");
pub(crate) const ENC_SYMPTOM: Code = c("185345009", "Encounter for symptom (procedure)");
pub(crate) const ENC_FOLLOW_UP: Code = c("390906007", "Follow-up encounter (procedure)");
pub(crate) const ENC_ER: Code = c("50849002", "Emergency room admission (procedure)");
pub(crate) const ENC_ADMISSION: Code = c("32485007", "Hospital admission (procedure)");

// --- Conditions (SNOMED) ---
pub(crate) const COND_HTN_ESSENTIAL: Code = c("59621000", "Essential hypertension (disorder)");
pub(crate) const COND_HTN: Code = c(
    "38341003",
    "Hypertensive disorder, systemic arterial (disorder)",
);
pub(crate) const COND_DIABETES: Code = c("44054006", "Diabetes mellitus type 2 (disorder)");
pub(crate) const COND_PREDIABETES: Code = c("15777000", "Prediabetes (finding)");
pub(crate) const COND_ASTHMA: Code = c("195967001", "Asthma (disorder)");
pub(crate) const COND_HYPERLIPIDEMIA: Code = c("55822004", "Hyperlipidemia (disorder)");
pub(crate) const COND_OBESITY: Code = c("162864005", "Body mass index 30+ - obesity (finding)");
pub(crate) const COND_SINUSITIS: Code = c("444814009", "Viral sinusitis (disorder)");
pub(crate) const COND_BRONCHITIS: Code = c("10509002", "Acute bronchitis (disorder)");
pub(crate) const COND_PHARYNGITIS: Code = c("195662009", "Acute viral pharyngitis (disorder)");
pub(crate) const COND_STREP: Code = c("43878008", "Streptococcal sore throat (disorder)");
pub(crate) const COND_OTITIS: Code = c("65363002", "Otitis media (disorder)");
pub(crate) const COND_PNEUMONIA: Code = c("233604007", "Pneumonia (disorder)");

// --- Medications (RxNorm) ---
pub(crate) const MED_METFORMIN: Code = c(
    "860975",
    "24 HR Metformin hydrochloride 500 MG Extended Release Oral Tablet",
);
pub(crate) const MED_LISINOPRIL: Code = c("314076", "lisinopril 10 MG Oral Tablet");
pub(crate) const MED_AMLODIPINE: Code = c("197361", "amlodipine 5 MG Oral Tablet");
pub(crate) const MED_SIMVASTATIN: Code = c("312961", "simvastatin 20 MG Oral Tablet");
pub(crate) const MED_ALBUTEROL: Code = c(
    "745679",
    "200 ACTUAT Albuterol 0.09 MG/ACTUAT Metered Dose Inhaler",
);
pub(crate) const MED_AMOXICILLIN: Code = c("308182", "Amoxicillin 250 MG Oral Capsule");
pub(crate) const MED_AMOX_CLAV: Code = c(
    "562251",
    "Amoxicillin 250 MG / Clavulanate 125 MG Oral Tablet",
);
pub(crate) const MED_PENICILLIN: Code = c("834061", "Penicillin V Potassium 250 MG Oral Tablet");
pub(crate) const MED_ACETAMINOPHEN: Code = c("313782", "Acetaminophen 325 MG Oral Tablet");

// --- Observations (LOINC) with their UCUM unit ---
/// A quantity observation: LOINC code, display, UCUM unit, category.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Measure {
    pub code: Code,
    pub unit: &'static str,
    pub category: Category,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Category {
    VitalSigns,
    Laboratory,
    SocialHistory,
    Exam,
}

impl Category {
    pub(crate) fn code(self) -> Code {
        match self {
            Category::VitalSigns => c("vital-signs", "Vital signs"),
            Category::Laboratory => c("laboratory", "Laboratory"),
            Category::SocialHistory => c("social-history", "Social History"),
            Category::Exam => c("exam", "Exam"),
        }
    }
}

const fn m(
    code: &'static str,
    display: &'static str,
    unit: &'static str,
    category: Category,
) -> Measure {
    Measure {
        code: c(code, display),
        unit,
        category,
    }
}

use Category::{Exam, Laboratory, SocialHistory, VitalSigns};

pub(crate) const OBS_HEIGHT: Measure = m("8302-2", "Body Height", "cm", VitalSigns);
pub(crate) const OBS_WEIGHT: Measure = m("29463-7", "Body Weight", "kg", VitalSigns);
pub(crate) const OBS_BMI: Measure = m("39156-5", "Body Mass Index", "kg/m2", VitalSigns);
pub(crate) const OBS_HEART_RATE: Measure = m("8867-4", "Heart rate", "/min", VitalSigns);
pub(crate) const OBS_RESP_RATE: Measure = m("9279-1", "Respiratory rate", "/min", VitalSigns);
pub(crate) const OBS_TEMPERATURE: Measure = m("8310-5", "Body temperature", "Cel", VitalSigns);
pub(crate) const OBS_BP_PANEL: Measure = m(
    "85354-9",
    "Blood pressure panel with all children optional",
    "mm[Hg]",
    VitalSigns,
);
pub(crate) const OBS_SYSTOLIC: Code = c("8480-6", "Systolic Blood Pressure");
pub(crate) const OBS_DIASTOLIC: Code = c("8462-4", "Diastolic Blood Pressure");
pub(crate) const OBS_GLUCOSE: Measure = m(
    "2339-0",
    "Glucose [Mass/volume] in Blood",
    "mg/dL",
    Laboratory,
);
pub(crate) const OBS_A1C: Measure = m(
    "4548-4",
    "Hemoglobin A1c/Hemoglobin.total in Blood",
    "%",
    Laboratory,
);
pub(crate) const OBS_CHOLESTEROL: Measure = m(
    "2093-3",
    "Cholesterol [Mass/volume] in Serum or Plasma",
    "mg/dL",
    Laboratory,
);
pub(crate) const OBS_CREATININE: Measure = m(
    "2160-0",
    "Creatinine [Mass/volume] in Serum or Plasma",
    "mg/dL",
    Laboratory,
);
pub(crate) const OBS_HEMOGLOBIN: Measure = m(
    "718-7",
    "Hemoglobin [Mass/volume] in Blood",
    "g/dL",
    Laboratory,
);
pub(crate) const OBS_SMOKING: Measure = m("72166-2", "Tobacco smoking status", "", SocialHistory);
pub(crate) const OBS_BLOOD_TYPE: Measure =
    m("882-1", "ABO and Rh group [Type] in Blood", "", Laboratory);
pub(crate) const OBS_HPI: Measure = m("10164-2", "History of Present illness Narrative", "", Exam);

pub(crate) const SMOKING_NEVER: Code = c("266919005", "Never smoked tobacco (finding)");
pub(crate) const SMOKING_FORMER: Code = c("8517006", "Ex-smoker (finding)");
pub(crate) const SMOKING_CURRENT: Code = c("449868002", "Smokes tobacco daily (finding)");

pub(crate) const BLOOD_TYPES: &[(&str, f64)] = &[
    ("O Rh(D) positive", 0.374),
    ("A Rh(D) positive", 0.357),
    ("B Rh(D) positive", 0.085),
    ("O Rh(D) negative", 0.066),
    ("A Rh(D) negative", 0.063),
    ("AB Rh(D) positive", 0.034),
    ("B Rh(D) negative", 0.015),
    ("AB Rh(D) negative", 0.006),
];

// --- Demographics ---
/// OMB race categories with approximate US shares.
pub(crate) const RACES: &[(Code, f64)] = &[
    (c("2106-3", "White"), 0.72),
    (c("2054-5", "Black or African American"), 0.13),
    (c("2028-9", "Asian"), 0.07),
    (c("1002-5", "American Indian or Alaska Native"), 0.01),
    (
        c("2076-8", "Native Hawaiian or Other Pacific Islander"),
        0.01,
    ),
    (c("2131-1", "Other Race"), 0.06),
];
pub(crate) const HISPANIC: Code = c("2135-2", "Hispanic or Latino");
pub(crate) const NOT_HISPANIC: Code = c("2186-5", "Not Hispanic or Latino");

pub(crate) const MARITAL: &[Code] = &[
    c("M", "Married"),
    c("S", "Never Married"),
    c("D", "Divorced"),
    c("W", "Widowed"),
];

pub(crate) const MALE_GIVEN: &[&str] = &[
    "James",
    "John",
    "Robert",
    "Michael",
    "William",
    "David",
    "Richard",
    "Joseph",
    "Thomas",
    "Charles",
    "Christopher",
    "Daniel",
    "Matthew",
    "Anthony",
    "Mark",
    "Donald",
    "Steven",
    "Paul",
    "Andrew",
    "Joshua",
    "Kenneth",
    "Kevin",
    "Brian",
    "George",
    "Timothy",
    "Ronald",
    "Edward",
    "Jason",
    "Jeffrey",
    "Ryan",
    "Jacob",
    "Gary",
    "Nicholas",
    "Eric",
    "Jonathan",
    "Stephen",
    "Larry",
    "Justin",
    "Scott",
    "Brandon",
    "Benjamin",
    "Samuel",
    "Gregory",
    "Alexander",
    "Patrick",
    "Frank",
    "Raymond",
    "Jack",
    "Dennis",
    "Jerry",
    "Tyler",
    "Aaron",
    "José",
    "Luis",
    "Carlos",
    "Juan",
    "Wei",
    "Hiroshi",
    "Mohammed",
    "Dmitri",
    "Björn",
    "Seán",
];

pub(crate) const FEMALE_GIVEN: &[&str] = &[
    "Mary",
    "Patricia",
    "Jennifer",
    "Linda",
    "Elizabeth",
    "Barbara",
    "Susan",
    "Jessica",
    "Sarah",
    "Karen",
    "Lisa",
    "Nancy",
    "Betty",
    "Margaret",
    "Sandra",
    "Ashley",
    "Kimberly",
    "Emily",
    "Donna",
    "Michelle",
    "Carol",
    "Amanda",
    "Dorothy",
    "Melissa",
    "Deborah",
    "Stephanie",
    "Rebecca",
    "Sharon",
    "Laura",
    "Cynthia",
    "Kathleen",
    "Amy",
    "Angela",
    "Shirley",
    "Anna",
    "Brenda",
    "Pamela",
    "Emma",
    "Nicole",
    "Helen",
    "Samantha",
    "Katherine",
    "Christine",
    "Debra",
    "Rachel",
    "Carolyn",
    "Janet",
    "Catherine",
    "Maria",
    "Heather",
    "Olivia",
    "Sophia",
    "María",
    "Guadalupe",
    "Mei",
    "Yuki",
    "Fatima",
    "Zoë",
    "Renée",
    "Siobhán",
    "Ingrid",
    "Chloé",
];

pub(crate) const FAMILY: &[&str] = &[
    "Smith",
    "Johnson",
    "Williams",
    "Brown",
    "Jones",
    "Garcia",
    "Miller",
    "Davis",
    "Rodriguez",
    "Martinez",
    "Hernandez",
    "Lopez",
    "Gonzalez",
    "Wilson",
    "Anderson",
    "Thomas",
    "Taylor",
    "Moore",
    "Jackson",
    "Martin",
    "Lee",
    "Perez",
    "Thompson",
    "White",
    "Harris",
    "Sanchez",
    "Clark",
    "Ramirez",
    "Lewis",
    "Robinson",
    "Walker",
    "Young",
    "Allen",
    "King",
    "Wright",
    "Scott",
    "Torres",
    "Nguyen",
    "Hill",
    "Flores",
    "Green",
    "Adams",
    "Nelson",
    "Baker",
    "Hall",
    "Rivera",
    "Campbell",
    "Mitchell",
    "Carter",
    "Roberts",
    "Gomez",
    "Phillips",
    "Evans",
    "Turner",
    "Diaz",
    "Parker",
    "Cruz",
    "Edwards",
    "Collins",
    "Reyes",
    "Stewart",
    "Morris",
    "Morales",
    "Murphy",
    "Cook",
    "Rogers",
    "Gutierrez",
    "Ortiz",
    "Morgan",
    "Cooper",
    "Peterson",
    "Bailey",
    "Reed",
    "Kelly",
    "Howard",
    "Ramos",
    "Kim",
    "Cox",
    "Ward",
    "Richardson",
    "Watson",
    "Brooks",
    "Chavez",
    "Wood",
    "James",
    "Bennett",
    "Gray",
    "Mendoza",
    "Ruiz",
    "Hughes",
    "Price",
    "Alvarez",
    "Castillo",
    "Sanders",
    "Patel",
    "Myers",
    "Long",
    "Ross",
    "Foster",
    "Jiménez",
    "Müller",
    "O'Connor",
    "D'Angelo",
    "Núñez",
    "Kowalski",
    "Yamamoto",
    "Chen",
    "Okafor",
    "Van der Berg",
    "Håkansson",
];

pub(crate) const STREETS: &[&str] = &[
    "Main",
    "Oak",
    "Pine",
    "Maple",
    "Cedar",
    "Elm",
    "Washington",
    "Lake",
    "Hill",
    "Park",
    "Walnut",
    "Spring",
    "North",
    "Ridge",
    "Church",
    "Willow",
    "Mill",
    "Sunset",
    "Jackson",
    "Cherry",
    "Highland",
    "Franklin",
    "Adams",
    "Lincoln",
    "Madison",
    "Chestnut",
    "Meadow",
    "Forest",
    "River",
    "Prospect",
];
pub(crate) const STREET_SUFFIXES: &[&str] = &[
    "Street",
    "Avenue",
    "Road",
    "Lane",
    "Drive",
    "Court",
    "Way",
    "Boulevard",
    "Place",
];

/// A city: name, state, ZIP prefix (3 digits), latitude, longitude.
pub(crate) struct City {
    pub name: &'static str,
    pub state: &'static str,
    pub zip3: &'static str,
    pub lat: f64,
    pub lon: f64,
}

const fn city(
    name: &'static str,
    state: &'static str,
    zip3: &'static str,
    lat: f64,
    lon: f64,
) -> City {
    City {
        name,
        state,
        zip3,
        lat,
        lon,
    }
}

pub(crate) const CITIES: &[City] = &[
    city("Boston", "MA", "021", 42.3601, -71.0589),
    city("Worcester", "MA", "016", 42.2626, -71.8023),
    city("Springfield", "MA", "011", 42.1015, -72.5898),
    city("Lowell", "MA", "018", 42.6334, -71.3162),
    city("Cambridge", "MA", "021", 42.3736, -71.1097),
    city("Providence", "RI", "029", 41.8240, -71.4128),
    city("Hartford", "CT", "061", 41.7658, -72.6734),
    city("New Haven", "CT", "065", 41.3083, -72.9279),
    city("Albany", "NY", "122", 42.6526, -73.7562),
    city("Buffalo", "NY", "142", 42.8864, -78.8784),
    city("Philadelphia", "PA", "191", 39.9526, -75.1652),
    city("Pittsburgh", "PA", "152", 40.4406, -79.9959),
    city("Baltimore", "MD", "212", 39.2904, -76.6122),
    city("Richmond", "VA", "232", 37.5407, -77.4360),
    city("Raleigh", "NC", "276", 35.7796, -78.6382),
    city("Atlanta", "GA", "303", 33.7490, -84.3880),
    city("Miami", "FL", "331", 25.7617, -80.1918),
    city("Tampa", "FL", "336", 27.9506, -82.4572),
    city("Nashville", "TN", "372", 36.1627, -86.7816),
    city("Cleveland", "OH", "441", 41.4993, -81.6944),
    city("Columbus", "OH", "432", 39.9612, -82.9988),
    city("Detroit", "MI", "482", 42.3314, -83.0458),
    city("Chicago", "IL", "606", 41.8781, -87.6298),
    city("Minneapolis", "MN", "554", 44.9778, -93.2650),
    city("St. Louis", "MO", "631", 38.6270, -90.1994),
    city("New Orleans", "LA", "701", 29.9511, -90.0715),
    city("Houston", "TX", "770", 29.7604, -95.3698),
    city("San Antonio", "TX", "782", 29.4241, -98.4936),
    city("Denver", "CO", "802", 39.7392, -104.9903),
    city("Albuquerque", "NM", "871", 35.0844, -106.6504),
    city("Phoenix", "AZ", "850", 33.4484, -112.0740),
    city("Salt Lake City", "UT", "841", 40.7608, -111.8910),
    city("Seattle", "WA", "981", 47.6062, -122.3321),
    city("Portland", "OR", "972", 45.5152, -122.6784),
    city("Sacramento", "CA", "958", 38.5816, -121.4944),
    city("Los Angeles", "CA", "900", 34.0522, -118.2437),
    city("San Diego", "CA", "921", 32.7157, -117.1611),
    city("Honolulu", "HI", "968", 21.3069, -157.8583),
    city("Anchorage", "AK", "995", 61.2181, -149.9003),
    city("Coeur d'Alene", "ID", "838", 47.6777, -116.7805),
];

/// A uniformly chosen city.
pub(crate) fn pick_city(s: &mut crate::rng::Stream) -> &'static City {
    &CITIES[s.index(CITIES.len())]
}

/// Picks from a weighted table; weights need not sum to one.
pub(crate) fn weighted<T: Copy>(table: &[(T, f64)], u: f64) -> T {
    let total: f64 = table.iter().map(|(_, w)| w).sum();
    let mut x = u * total;
    for &(item, w) in table {
        if x < w {
            return item;
        }
        x -= w;
    }
    table[table.len() - 1].0
}

/// Appends the Luhn check digit the NPI standard defines (prefix 80840).
pub(crate) fn npi_with_check_digit(base9: &str) -> String {
    let digits: Vec<u32> = format!("80840{base9}")
        .bytes()
        .map(|b| u32::from(b - b'0'))
        .collect();
    let sum: u32 = digits
        .iter()
        .rev()
        .enumerate()
        .map(|(i, &d)| {
            if i % 2 == 0 {
                let x = d * 2;
                if x > 9 { x - 9 } else { x }
            } else {
                d
            }
        })
        .sum();
    format!("{base9}{}", (10 - sum % 10) % 10)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn npi_check_digit() {
        // The CMS example NPI.
        assert_eq!(npi_with_check_digit("123456789"), "1234567893");
    }

    #[test]
    fn tables_need_no_escaping_except_names() {
        let mut plain: Vec<&str> = vec![HTEST_TAG];
        plain.extend(STREETS.iter().chain(STREET_SUFFIXES));
        for s in plain {
            assert!(!s.contains('\\'));
        }
        for code in [COND_HTN, MED_ALBUTEROL, OBS_BP_PANEL.code, SMOKING_CURRENT] {
            assert!(!code.display.contains('"') && !code.display.contains('\\'));
        }
    }
}
