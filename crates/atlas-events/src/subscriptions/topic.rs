//! SubscriptionTopics: the ones Atlas offers, their R4 form, and the parse
//! of a client's.
//!
//! R4 has no SubscriptionTopic resource; the backport IG carries a topic as
//! a `Basic` (code `SubscriptionTopic` of `http://hl7.org/fhir/fhir-types`)
//! whose elements are the cross-version extensions
//! (`extension-SubscriptionTopic.url`, `.resourceTrigger`,
//! `.canFilterBy`, ...). Atlas's topics are plain resource triggers: one
//! per supported resource type, firing on create, update and delete, with
//! the search parameters of [`params`] as filters. Everything a topic can
//! say beyond that (query or FHIRPath criteria, event triggers,
//! notification shapes with includes) needs state Atlas does not keep (the
//! previous version of a resource) or reads it does not make, so a topic
//! asking for it is refused, element by element.

use serde_json::{Value as Json, json};

use super::{Interaction, IssueCode, Issues, Rejection, kebab};

/// Where Atlas's topics' canonical URLs live (the IG's examples name
/// theirs `<base>/SubscriptionTopic/<name>`).
pub const TOPIC_BASE: &str = "http://atlas.local/SubscriptionTopic/";
/// `Basic.code` of a topic.
pub const FHIR_TYPES: &str = "http://hl7.org/fhir/fhir-types";
/// The cross-version extensions of the topic's own elements (R5 names) ...
const X5: &str = "http://hl7.org/fhir/5.0/StructureDefinition/extension-SubscriptionTopic.";
/// ... and of its backbone elements (R4B names), as the IG's example uses them.
const X43: &str = "http://hl7.org/fhir/4.3/StructureDefinition/extension-SubscriptionTopic.";

/// How a search parameter is evaluated on a change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParamKind {
    /// `_id`: the resource id.
    Id,
    /// `patient`: the patient compartment the store files the resource
    /// under (the same key access decisions read), as `Patient/<id>` or `<id>`.
    Patient,
    /// A reference element (`subject`), compared as `Type/id`.
    Reference(&'static str),
    /// A token on a CodeableConcept or Coding element (or a list of them):
    /// `code`, `system|code`, `|code`, `system|`.
    Token(&'static str),
    /// A token on a plain `code` element (`status`).
    Code(&'static str),
}

impl ParamKind {
    /// The element of the resource JSON the parameter reads (what a grant
    /// hiding that element must also keep out of filters).
    pub fn element(self) -> Option<&'static str> {
        match self {
            ParamKind::Id | ParamKind::Patient => None,
            ParamKind::Reference(e) | ParamKind::Token(e) | ParamKind::Code(e) => Some(e),
        }
    }

    /// Whether the parameter reads the resource's content (a delete has
    /// none, so such a filter never matches a delete).
    pub fn reads_content(self) -> bool {
        self.element().is_some()
    }
}

type Params = &'static [(&'static str, ParamKind)];

use ParamKind::{Code, Id, Patient as Pat, Reference as Ref, Token as Tok};

/// The resource types Atlas offers topics for, with the search parameters
/// their subscriptions may filter on (R4 names and elements).
const SUPPORTED: &[(&str, Params)] = &[
    ("Patient", &[("_id", Id)]),
    (
        "Observation",
        &[
            ("_id", Id),
            ("patient", Pat),
            ("subject", Ref("subject")),
            ("code", Tok("code")),
            ("category", Tok("category")),
            ("status", Code("status")),
        ],
    ),
    (
        "Condition",
        &[
            ("_id", Id),
            ("patient", Pat),
            ("subject", Ref("subject")),
            ("code", Tok("code")),
            ("category", Tok("category")),
            ("clinical-status", Tok("clinicalStatus")),
        ],
    ),
    (
        "Encounter",
        &[
            ("_id", Id),
            ("patient", Pat),
            ("subject", Ref("subject")),
            ("class", Tok("class")),
            ("type", Tok("type")),
            ("status", Code("status")),
        ],
    ),
    (
        "MedicationRequest",
        &[
            ("_id", Id),
            ("patient", Pat),
            ("subject", Ref("subject")),
            ("code", Tok("medicationCodeableConcept")),
            ("intent", Code("intent")),
            ("status", Code("status")),
        ],
    ),
    (
        "Procedure",
        &[
            ("_id", Id),
            ("patient", Pat),
            ("subject", Ref("subject")),
            ("code", Tok("code")),
            ("status", Code("status")),
        ],
    ),
    (
        "DiagnosticReport",
        &[
            ("_id", Id),
            ("patient", Pat),
            ("subject", Ref("subject")),
            ("code", Tok("code")),
            ("category", Tok("category")),
            ("status", Code("status")),
        ],
    ),
    (
        "Immunization",
        &[
            ("_id", Id),
            ("patient", Pat),
            ("vaccine-code", Tok("vaccineCode")),
            ("status", Code("status")),
        ],
    ),
    (
        "AllergyIntolerance",
        &[
            ("_id", Id),
            ("patient", Pat),
            ("code", Tok("code")),
            ("clinical-status", Tok("clinicalStatus")),
        ],
    ),
    (
        "CarePlan",
        &[
            ("_id", Id),
            ("patient", Pat),
            ("subject", Ref("subject")),
            ("status", Code("status")),
        ],
    ),
    (
        "CareTeam",
        &[
            ("_id", Id),
            ("patient", Pat),
            ("subject", Ref("subject")),
            ("status", Code("status")),
        ],
    ),
    (
        "DocumentReference",
        &[
            ("_id", Id),
            ("patient", Pat),
            ("subject", Ref("subject")),
            ("type", Tok("type")),
            ("status", Code("status")),
        ],
    ),
];

/// The resource types Atlas can offer topics for.
pub fn supported_types() -> impl Iterator<Item = &'static str> {
    SUPPORTED.iter().map(|(t, _)| *t)
}

/// The search parameters a filter on `resource_type` may use.
pub fn params(resource_type: &str) -> Option<Params> {
    SUPPORTED
        .iter()
        .find(|(t, _)| *t == resource_type)
        .map(|(_, p)| *p)
}

/// How `param` of `resource_type` is evaluated, when Atlas can.
pub fn param_kind(resource_type: &str, param: &str) -> Option<ParamKind> {
    params(resource_type)?
        .iter()
        .find(|(n, _)| *n == param)
        .map(|(_, k)| *k)
}

/// One resource trigger: changes of a type, by interaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trigger {
    pub resource_type: String,
    pub interactions: Vec<Interaction>,
    pub description: String,
}

/// One filter a topic allows (`canFilterBy`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FilterDef {
    pub resource_type: String,
    pub param: String,
    pub description: String,
}

/// A SubscriptionTopic Atlas can evaluate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topic {
    /// The `Basic` id it is served under.
    pub id: String,
    /// The canonical URL subscriptions name in `criteria`.
    pub url: String,
    pub version: Option<String>,
    pub name: String,
    pub title: String,
    pub description: String,
    /// `draft`, `active` or `retired`.
    pub status: String,
    pub triggers: Vec<Trigger>,
    pub can_filter_by: Vec<FilterDef>,
}

impl Topic {
    /// Atlas's topic for changes of `resource_type` (create, update,
    /// delete), filterable on every parameter [`params`] lists for it.
    pub fn builtin(resource_type: &str) -> Option<Topic> {
        let params = params(resource_type)?;
        let name = format!("{}-change", kebab(resource_type));
        Some(Topic {
            id: format!("atlas-topic-{name}"),
            url: format!("{TOPIC_BASE}{name}"),
            version: Some(env!("CARGO_PKG_VERSION").to_owned()),
            name: format!("Atlas{resource_type}Change"),
            title: format!("{resource_type} created, updated or deleted"),
            description: format!(
                "Every change to a {resource_type} in the Atlas lake: created, updated or deleted \
                 (as an ingest commits it)."
            ),
            status: "active".into(),
            triggers: vec![Trigger {
                resource_type: resource_type.to_owned(),
                interactions: vec![
                    Interaction::Create,
                    Interaction::Update,
                    Interaction::Delete,
                ],
                description: format!("A {resource_type} is created, updated or deleted."),
            }],
            can_filter_by: params
                .iter()
                .map(|(p, k)| FilterDef {
                    resource_type: resource_type.to_owned(),
                    param: (*p).to_owned(),
                    description: describe(resource_type, p, *k),
                })
                .collect(),
        })
    }

    /// The trigger for changes of `resource_type`, if the topic has one.
    pub fn trigger(&self, resource_type: &str) -> Option<&Trigger> {
        self.triggers
            .iter()
            .find(|t| t.resource_type == resource_type)
    }

    /// Whether the topic fires for this change.
    pub fn fires(&self, resource_type: &str, interaction: Interaction) -> bool {
        self.trigger(resource_type)
            .is_some_and(|t| t.interactions.contains(&interaction))
    }

    /// Whether a subscription may filter changes of `resource_type` on `param`.
    pub fn can_filter(&self, resource_type: &str, param: &str) -> bool {
        self.can_filter_by
            .iter()
            .any(|f| f.resource_type == resource_type && f.param == param)
    }

    /// The topic as an R4 `Basic` (the IG's cross-version form).
    pub fn to_basic(&self) -> Json {
        let mut ext = vec![json!({"url": format!("{X5}url"), "valueUri": self.url})];
        if let Some(v) = &self.version {
            ext.push(json!({"url": format!("{X5}version"), "valueString": v}));
        }
        ext.push(json!({"url": format!("{X5}name"), "valueString": self.name}));
        ext.push(json!({"url": format!("{X5}title"), "valueString": self.title}));
        ext.push(json!({"url": format!("{X5}description"), "valueMarkdown": self.description}));
        for t in &self.triggers {
            let mut parts = vec![
                json!({"url": "description", "valueMarkdown": t.description}),
                json!({"url": "resource", "valueUri": format!("http://hl7.org/fhir/StructureDefinition/{}", t.resource_type)}),
            ];
            for i in &t.interactions {
                parts.push(json!({"url": "supportedInteraction", "valueCode": i.code()}));
            }
            ext.push(json!({"url": format!("{X43}resourceTrigger"), "extension": parts}));
        }
        for f in &self.can_filter_by {
            ext.push(json!({
                "url": format!("{X43}canFilterBy"),
                "extension": [
                    {"url": "description", "valueMarkdown": f.description},
                    {"url": "resource", "valueUri": f.resource_type},
                    {"url": "filterParameter", "valueString": f.param},
                ]
            }));
        }
        json!({
            "resourceType": "Basic",
            "id": self.id,
            "modifierExtension": [
                {"url": format!("{X5}status"), "valueCode": self.status}
            ],
            "extension": ext,
            "code": {"coding": [{"system": FHIR_TYPES, "code": "SubscriptionTopic"}]},
        })
    }

    /// A client's topic (`Basic` in the IG's form), accepted only when
    /// Atlas can evaluate all of it: resource triggers on supported types
    /// (create, update, delete), filters on supported parameters, no query
    /// or FHIRPath criteria, no event triggers, no includes.
    pub fn from_basic(basic: &Json) -> Result<Topic, Rejection> {
        let mut issues = Issues::default();
        if basic.get("resourceType").and_then(Json::as_str) != Some("Basic") {
            return Err(Rejection::one(
                IssueCode::Structure,
                "Basic",
                "a SubscriptionTopic in R4 is a Basic resource",
            ));
        }
        let is_topic = basic["code"]["coding"]
            .as_array()
            .is_some_and(|c| c.iter().any(|c| c["code"] == "SubscriptionTopic"));
        if !is_topic {
            issues.push(
                IssueCode::Value,
                "Basic.code",
                "a topic's Basic.code is SubscriptionTopic (http://hl7.org/fhir/fhir-types)",
            );
        }
        let mut t = Topic {
            id: basic["id"].as_str().unwrap_or_default().to_owned(),
            url: String::new(),
            version: None,
            name: String::new(),
            title: String::new(),
            description: String::new(),
            status: "active".into(),
            triggers: Vec::new(),
            can_filter_by: Vec::new(),
        };
        for m in basic["modifierExtension"].as_array().into_iter().flatten() {
            match element_name(m) {
                Some("status") => {
                    t.status = m["valueCode"].as_str().unwrap_or("active").to_owned();
                }
                _ => issues.push(
                    IssueCode::NotSupported,
                    "Basic.modifierExtension",
                    format!(
                        "modifier extension {} is not understood",
                        m["url"].as_str().unwrap_or("(no url)")
                    ),
                ),
            }
        }
        for (n, e) in basic["extension"]
            .as_array()
            .into_iter()
            .flatten()
            .enumerate()
        {
            let at = format!("Basic.extension[{n}]");
            let text = |k: &str| e[k].as_str().unwrap_or_default().to_owned();
            match element_name(e) {
                Some("url") => t.url = text("valueUri"),
                Some("version") => t.version = Some(text("valueString")),
                Some("name") => t.name = text("valueString"),
                Some("title") => t.title = text("valueString"),
                Some("description") => t.description = text("valueMarkdown"),
                Some("status") => t.status = text("valueCode"),
                Some("resourceTrigger") => match trigger(e, &at) {
                    Ok(tr) => t.triggers.push(tr),
                    Err(r) => issues.extend(r),
                },
                Some("canFilterBy") => match can_filter_by(e, &at) {
                    Ok(f) => t.can_filter_by.push(f),
                    Err(r) => issues.extend(r),
                },
                Some("notificationShape") => {
                    for p in e["extension"].as_array().into_iter().flatten() {
                        let url = p["url"].as_str().unwrap_or_default();
                        if url != "resource" {
                            issues.push(
                                IssueCode::NotSupported,
                                &format!("{at}.notificationShape"),
                                format!(
                                    "notification shapes beyond the focus resource ({url}) are not supported"
                                ),
                            );
                        }
                    }
                }
                Some(
                    "date" | "experimental" | "publisher" | "contact" | "jurisdiction" | "purpose"
                    | "copyright" | "approvalDate" | "lastReviewDate" | "effectivePeriod"
                    | "identifier" | "derivedFrom" | "useContext",
                ) => {}
                Some(other) => issues.push(
                    IssueCode::NotSupported,
                    &at,
                    format!("SubscriptionTopic.{other} is not supported"),
                ),
                // Other extensions say nothing Atlas must act on.
                None => {}
            }
        }
        if t.url.is_empty() {
            issues.push(
                IssueCode::Required,
                "Basic.extension:url",
                "a topic needs its canonical url (extension-SubscriptionTopic.url)",
            );
        }
        if t.triggers.is_empty() && issues.0.is_empty() {
            issues.push(
                IssueCode::Required,
                "Basic.extension:resourceTrigger",
                "a topic needs at least one resourceTrigger",
            );
        }
        // Only worth saying when the triggers themselves were accepted.
        let triggers_ok = issues.0.is_empty();
        for f in t.can_filter_by.iter().filter(|_| triggers_ok) {
            if t.trigger(&f.resource_type).is_none() {
                issues.push(
                    IssueCode::Value,
                    "Basic.extension:canFilterBy",
                    format!(
                        "canFilterBy names {}, which no trigger of the topic fires for",
                        f.resource_type
                    ),
                );
            }
        }
        if t.id.is_empty() {
            t.id = format!("topic-{}", kebab(&t.name));
        }
        issues.into_result(t)
    }
}

/// The element a cross-version extension stands for (`resourceTrigger`).
fn element_name(e: &Json) -> Option<&str> {
    let url = e["url"].as_str()?;
    url.strip_prefix(X5).or_else(|| url.strip_prefix(X43))
}

/// `http://hl7.org/fhir/StructureDefinition/Encounter` or `Encounter`.
fn resource_name(uri: &str) -> &str {
    uri.rsplit('/').next().unwrap_or(uri)
}

fn trigger(e: &Json, at: &str) -> Result<Trigger, Rejection> {
    let mut issues = Issues::default();
    let mut t = Trigger {
        resource_type: String::new(),
        interactions: Vec::new(),
        description: String::new(),
    };
    for p in e["extension"].as_array().into_iter().flatten() {
        match p["url"].as_str().unwrap_or_default() {
            "description" => t.description = p["valueMarkdown"].as_str().unwrap_or_default().into(),
            "resource" => {
                t.resource_type = resource_name(p["valueUri"].as_str().unwrap_or_default()).into();
            }
            "supportedInteraction" => {
                let code = p["valueCode"].as_str().unwrap_or_default();
                match Interaction::parse(code) {
                    Some(i) => t.interactions.push(i),
                    None => issues.push(
                        IssueCode::Value,
                        &format!("{at}.supportedInteraction"),
                        format!("interaction '{code}' is not create, update or delete"),
                    ),
                }
            }
            "queryCriteria" => issues.push(
                IssueCode::NotSupported,
                &format!("{at}.queryCriteria"),
                "query criteria (previous/current state tests) are not supported: Atlas triggers on every create, update and delete and narrows with filters",
            ),
            "fhirPathCriteria" => issues.push(
                IssueCode::NotSupported,
                &format!("{at}.fhirPathCriteria"),
                "FHIRPath criteria are not supported: Atlas triggers on every create, update and delete and narrows with filters",
            ),
            other => issues.push(
                IssueCode::NotSupported,
                &format!("{at}.{other}"),
                format!("resourceTrigger.{other} is not supported"),
            ),
        }
    }
    if t.resource_type.is_empty() {
        issues.push(
            IssueCode::Required,
            &format!("{at}.resource"),
            "a trigger names its resource",
        );
    } else if params(&t.resource_type).is_none() {
        issues.push(
            IssueCode::NotSupported,
            &format!("{at}.resource"),
            format!(
                "Atlas has no topics for {}; supported: {}",
                t.resource_type,
                supported_types().collect::<Vec<_>>().join(", ")
            ),
        );
    }
    if t.interactions.is_empty() {
        // The R5 default: every interaction.
        t.interactions = vec![
            Interaction::Create,
            Interaction::Update,
            Interaction::Delete,
        ];
    }
    issues.into_result(t)
}

fn can_filter_by(e: &Json, at: &str) -> Result<FilterDef, Rejection> {
    let mut issues = Issues::default();
    let mut f = FilterDef {
        resource_type: String::new(),
        param: String::new(),
        description: String::new(),
    };
    for p in e["extension"].as_array().into_iter().flatten() {
        match p["url"].as_str().unwrap_or_default() {
            "description" => f.description = p["valueMarkdown"].as_str().unwrap_or_default().into(),
            "resource" => {
                f.resource_type = resource_name(p["valueUri"].as_str().unwrap_or_default()).into();
            }
            "filterParameter" => f.param = p["valueString"].as_str().unwrap_or_default().into(),
            // Definitions and comparators only describe the parameter.
            "filterDefinition" | "comparator" => {}
            "modifier" => issues.push(
                IssueCode::NotSupported,
                &format!("{at}.modifier"),
                "search modifiers on filters are not supported",
            ),
            other => issues.push(
                IssueCode::NotSupported,
                &format!("{at}.{other}"),
                format!("canFilterBy.{other} is not supported"),
            ),
        }
    }
    if f.param.is_empty() {
        issues.push(
            IssueCode::Required,
            &format!("{at}.filterParameter"),
            "canFilterBy names its parameter",
        );
    } else if param_kind(&f.resource_type, &f.param).is_none() {
        issues.push(
            IssueCode::NotSupported,
            &format!("{at}.filterParameter"),
            format!(
                "filtering {} on '{}' is not supported; supported: {}",
                f.resource_type,
                f.param,
                params(&f.resource_type)
                    .map(|p| p.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", "))
                    .unwrap_or_else(|| "none (type not supported)".into())
            ),
        );
    }
    issues.into_result(f)
}

fn describe(resource_type: &str, param: &str, kind: ParamKind) -> String {
    match kind {
        ParamKind::Id => format!("The {resource_type}'s id."),
        ParamKind::Patient => {
            format!("The patient whose compartment the {resource_type} is in (Patient/<id>).")
        }
        ParamKind::Reference(e) => format!("{resource_type}.{e} (a reference, Type/id)."),
        ParamKind::Token(e) => format!(
            "{resource_type}.{e} as a token: code, system|code, |code or system| ({param})."
        ),
        ParamKind::Code(e) => format!("{resource_type}.{e} (a code)."),
    }
}

/// The topics a server offers, by canonical URL.
#[derive(Debug, Clone, Default)]
pub struct TopicCatalog {
    topics: Vec<Topic>,
}

/// The types offered when the configuration names none.
pub const DEFAULT_TYPES: &[&str] = &[
    "Patient",
    "Encounter",
    "Observation",
    "Condition",
    "MedicationRequest",
    "Procedure",
    "DiagnosticReport",
    "Immunization",
    "AllergyIntolerance",
    "CarePlan",
    "CareTeam",
    "DocumentReference",
];

impl TopicCatalog {
    /// Atlas's topic for each of `types`; a type Atlas has no parameters
    /// for is an error naming it.
    pub fn builtin<S: AsRef<str>>(types: &[S]) -> Result<TopicCatalog, String> {
        let mut topics = Vec::new();
        for t in types {
            let t = t.as_ref();
            let topic = Topic::builtin(t).ok_or_else(|| {
                format!(
                    "no subscription topic for '{t}'; supported: {}",
                    supported_types().collect::<Vec<_>>().join(", ")
                )
            })?;
            if !topics.iter().any(|x: &Topic| x.url == topic.url) {
                topics.push(topic);
            }
        }
        Ok(TopicCatalog { topics })
    }

    /// Adds (or replaces, by URL) a topic.
    pub fn with(mut self, topic: Topic) -> TopicCatalog {
        self.topics.retain(|t| t.url != topic.url);
        self.topics.push(topic);
        self
    }

    /// The topic a subscription's `criteria` names (`url` or `url|version`).
    pub fn get(&self, canonical: &str) -> Option<&Topic> {
        let (url, version) = match canonical.split_once('|') {
            Some((u, v)) => (u, Some(v)),
            None => (canonical, None),
        };
        self.topics.iter().find(|t| {
            t.url == url && version.is_none_or(|v| t.version.as_deref().is_none_or(|tv| tv == v))
        })
    }

    /// The topic served as `Basic/<id>`.
    pub fn by_id(&self, id: &str) -> Option<&Topic> {
        self.topics.iter().find(|t| t.id == id)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Topic> {
        self.topics.iter()
    }

    pub fn len(&self) -> usize {
        self.topics.len()
    }

    pub fn is_empty(&self) -> bool {
        self.topics.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_topics_round_trip_through_basic() {
        let cat = TopicCatalog::builtin(DEFAULT_TYPES).unwrap();
        assert_eq!(cat.len(), DEFAULT_TYPES.len());
        let obs = cat
            .get("http://atlas.local/SubscriptionTopic/observation-change")
            .unwrap();
        assert!(obs.fires("Observation", Interaction::Delete));
        assert!(!obs.fires("Condition", Interaction::Create));
        assert!(obs.can_filter("Observation", "code"));
        let back = Topic::from_basic(&obs.to_basic()).unwrap();
        assert_eq!(&back, obs);
        let mr = cat.by_id("atlas-topic-medication-request-change").unwrap();
        assert_eq!(
            mr.url,
            "http://atlas.local/SubscriptionTopic/medication-request-change"
        );
        assert!(TopicCatalog::builtin(&["Organization"]).is_err());
    }

    #[test]
    fn versioned_canonicals_find_their_topic() {
        let cat = TopicCatalog::builtin(&["Patient"]).unwrap();
        let url = "http://atlas.local/SubscriptionTopic/patient-change";
        assert!(cat.get(url).is_some());
        let v = format!("{url}|{}", env!("CARGO_PKG_VERSION"));
        assert!(cat.get(&v).is_some());
        assert!(cat.get(&format!("{url}|0.0.0-other")).is_none());
    }

    #[test]
    fn a_client_topic_with_criteria_atlas_cannot_evaluate_is_refused() {
        let basic = json!({
            "resourceType": "Basic",
            "extension": [
                {"url": format!("{X5}url"), "valueUri": "http://x/t"},
                {"url": format!("{X43}resourceTrigger"), "extension": [
                    {"url": "resource", "valueUri": "Encounter"},
                    {"url": "queryCriteria", "extension": []}
                ]},
                {"url": format!("{X43}canFilterBy"), "extension": [
                    {"url": "resource", "valueUri": "Encounter"},
                    {"url": "filterParameter", "valueString": "_in"}
                ]}
            ],
            "code": {"coding": [{"system": FHIR_TYPES, "code": "SubscriptionTopic"}]}
        });
        let r = Topic::from_basic(&basic).unwrap_err();
        assert!(r.names("Basic.extension[1].queryCriteria"), "{r}");
        assert!(r.names("Basic.extension[2].filterParameter"), "{r}");
        assert_eq!(r.status(), 422);
    }
}
