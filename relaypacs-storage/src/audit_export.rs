//! Export of audit events as DICOM PS3.15 A.5 audit messages or JSON lines.
//!
//! [`export_events`] is a pure function: events and a time range in, bytes
//! out. In the `dicom-xml` format every event becomes one `AuditMessage`
//! following the DICOM audit message schema (PS3.15 A.5.1):
//!
//! - `EventIdentification` with `EventActionCode`, `EventDateTime` (UTC),
//!   `EventOutcomeIndicator`, the `EventID` (DCM 110xxx, PS3.16 CID 400),
//!   an `EventTypeCode` where one applies (CID 401) and the event's free
//!   text as `EventOutcomeDescription`;
//! - an `ActiveParticipant` for the user (requestor, with the client address
//!   as `NetworkAccessPointID`) and one for this application;
//! - `AuditSourceIdentification` (application server process);
//! - `ParticipantObjectIdentification` for the study (Study Instance UID,
//!   110180), the patient (RFC 3881 patient number) and the RelayPACS
//!   session, when the event names them.
//!
//! The messages are enclosed in one `AuditMessages` root element (not part
//! of PS3.15; it only makes the file one well-formed XML document). Text
//! and attribute values are escaped; characters XML 1.0 cannot carry are
//! replaced by U+FFFD.

use std::borrow::Cow;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;

use base64::Engine;
use base64::prelude::BASE64_STANDARD;
use quick_xml::Writer;
use quick_xml::events::attributes::Attribute;
use quick_xml::events::{BytesDecl, BytesEnd, BytesStart, BytesText, Event};
use quick_xml::name::QName;
use relaypacs_core::{AuditAction, AuditEvent};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// Output format of an export.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ExportFormat {
    /// DICOM PS3.15 A.5 audit messages (XML).
    DicomXml,
    /// One JSON audit event per line (RelayPACS's own event model).
    Jsonl,
}

impl FromStr for ExportFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "dicom-xml" => Ok(Self::DicomXml),
            "jsonl" => Ok(Self::Jsonl),
            other => Err(format!(
                "unknown export format {other:?} (dicom-xml or jsonl)"
            )),
        }
    }
}

/// Which events an export takes: `from` inclusive, `to` exclusive, either
/// bound optional.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TimeRange {
    /// Earliest event time taken.
    pub from: Option<OffsetDateTime>,
    /// Events at or after this time are left out.
    pub to: Option<OffsetDateTime>,
}

impl TimeRange {
    /// Whether `t` lies in the range.
    pub fn contains(&self, t: OffsetDateTime) -> bool {
        self.from.is_none_or(|f| t >= f) && self.to.is_none_or(|e| t < e)
    }
}

/// Why an export could not be written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ExportError {
    /// An event could not be encoded.
    #[error("cannot encode audit event {index}: {reason}")]
    Encode {
        /// Position of the event in the input.
        index: usize,
        /// What failed.
        reason: String,
    },
}

/// Export the events of `events` that lie in `range`, in order, in
/// `format`. `source_id` names this application in DICOM messages
/// (`AuditSourceID` and the application's `ActiveParticipant`).
pub fn export_events(
    events: &[AuditEvent],
    range: TimeRange,
    format: ExportFormat,
    source_id: &str,
) -> Result<Vec<u8>, ExportError> {
    let selected = events
        .iter()
        .enumerate()
        .filter(|(_, e)| range.contains(e.time));
    match format {
        ExportFormat::Jsonl => {
            let mut out = Vec::new();
            for (index, e) in selected {
                serde_json::to_writer(&mut out, e).map_err(|err| ExportError::Encode {
                    index,
                    reason: err.to_string(),
                })?;
                out.push(b'\n');
            }
            Ok(out)
        }
        ExportFormat::DicomXml => {
            let mut w = Writer::new_with_indent(Vec::new(), b' ', 2);
            let enc = |index: usize| {
                move |err: std::io::Error| ExportError::Encode {
                    index,
                    reason: err.to_string(),
                }
            };
            w.write_event(Event::Decl(BytesDecl::new("1.0", Some("UTF-8"), None)))
                .map_err(enc(0))?;
            w.write_event(Event::Start(BytesStart::new("AuditMessages")))
                .map_err(enc(0))?;
            for (index, e) in selected {
                write_message(&mut w, e, source_id).map_err(enc(index))?;
            }
            w.write_event(Event::End(BytesEnd::new("AuditMessages")))
                .map_err(enc(0))?;
            let mut out = w.into_inner();
            out.push(b'\n');
            Ok(out)
        }
    }
}

/// Escape `s` for an XML 1.0 attribute value or text: markup characters as
/// entities, tab/CR/LF as character references (so attribute value
/// normalisation keeps them), characters XML 1.0 forbids as U+FFFD.
fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            '\t' => out.push_str("&#9;"),
            '\n' => out.push_str("&#10;"),
            '\r' => out.push_str("&#13;"),
            c if (c as u32) < 0x20 || c == '\u{FFFE}' || c == '\u{FFFF}' => out.push('\u{FFFD}'),
            c => out.push(c),
        }
    }
    out
}

/// An attribute whose value is escaped by [`escape`].
fn attr<'a>(key: &'a str, value: &str) -> Attribute<'a> {
    Attribute {
        key: QName(key.as_bytes()),
        value: Cow::Owned(escape(value).into_bytes()),
    }
}

/// A coded value (`csd-code`, `codeSystemName`, `originalText`).
fn coded<'a>(name: &'a str, code: &str, system: &str, text: &str) -> BytesStart<'a> {
    BytesStart::new(name).with_attributes([
        attr("csd-code", code),
        attr("codeSystemName", system),
        attr("originalText", text),
    ])
}

/// Meaning of a DICOM audit Event ID (PS3.16 CID 400).
fn event_id_meaning(id: u32) -> Option<&'static str> {
    Some(match id {
        110100 => "Application Activity",
        110101 => "Audit Log Used",
        110102 => "Begin Transferring DICOM Instances",
        110103 => "DICOM Instances Accessed",
        110104 => "DICOM Instances Transferred",
        110105 => "DICOM Study Deleted",
        110106 => "Export",
        110107 => "Import",
        110108 => "Network Entry",
        110109 => "Order Record",
        110110 => "Patient Record",
        110111 => "Procedure Record",
        110112 => "Query",
        110113 => "Security Alert",
        110114 => "User Authentication",
        _ => return None,
    })
}

/// EventActionCode (C, R, U, D, E) of an Event ID, as PS3.15 A.5.3 uses it.
fn action_code(id: u32) -> &'static str {
    match id {
        110107 => "C",          // Import: created here
        110105 => "D",          // Study Deleted
        110101..=110104 => "R", // Audit Log Used, transfers out, accesses: read
        _ => "E",               // Execute
    }
}

/// EventTypeCode (PS3.16 CID 401) of an action, where one applies.
fn event_type(action: AuditAction) -> Option<(&'static str, &'static str)> {
    match action {
        AuditAction::ApplicationStart => Some(("110120", "Application Start")),
        AuditAction::ApplicationStop => Some(("110121", "Application Stop")),
        AuditAction::Login => Some(("110122", "Login")),
        AuditAction::Logout => Some(("110123", "Logout")),
        AuditAction::UserChanged => Some(("110137", "User Security Attributes Changed")),
        _ => None,
    }
}

/// The action's name in the trail (`session_created`, ...).
fn action_name(action: AuditAction) -> String {
    serde_json::to_value(action)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_else(|| format!("{action:?}"))
}

fn write_message(w: &mut Writer<Vec<u8>>, e: &AuditEvent, source_id: &str) -> std::io::Result<()> {
    let when = e
        .time
        .to_offset(time::UtcOffset::UTC)
        .format(&Rfc3339)
        .map_err(std::io::Error::other)?;
    let outcome = e.outcome.code().to_string();
    let id = e.event_id.to_string();
    let name = action_name(e.action);
    let meaning = event_id_meaning(e.event_id).unwrap_or(name.as_str());

    w.write_event(Event::Start(BytesStart::new("AuditMessage")))?;

    // Event identification.
    w.write_event(Event::Start(
        BytesStart::new("EventIdentification").with_attributes([
            attr("EventActionCode", action_code(e.event_id)),
            attr("EventDateTime", &when),
            attr("EventOutcomeIndicator", &outcome),
        ]),
    ))?;
    w.write_event(Event::Empty(coded("EventID", &id, "DCM", meaning)))?;
    if let Some((code, text)) = event_type(e.action) {
        w.write_event(Event::Empty(coded("EventTypeCode", code, "DCM", text)))?;
    }
    let description = if e.detail.is_empty() {
        name.clone()
    } else {
        format!("{name}: {}", e.detail)
    };
    w.write_event(Event::Start(BytesStart::new("EventOutcomeDescription")))?;
    w.write_event(Event::Text(BytesText::from_escaped(escape(&description))))?;
    w.write_event(Event::End(BytesEnd::new("EventOutcomeDescription")))?;
    w.write_event(Event::End(BytesEnd::new("EventIdentification")))?;

    // Active participants: the user (the requestor), then this application.
    let system = e.user == "system";
    let role = match e.event_id {
        110107 => Some(("110152", "Destination Role ID")), // we receive the import
        110102 | 110104 => Some(("110153", "Source Role ID")), // we send to the PACS
        110100 => Some(("110150", "Application")),
        _ => None,
    };
    if !system {
        let mut user = BytesStart::new("ActiveParticipant")
            .with_attributes([attr("UserID", &e.user), attr("UserIsRequestor", "true")]);
        if let Some(addr) = &e.address {
            let ip = addr
                .parse::<IpAddr>()
                .ok()
                .or_else(|| addr.parse::<SocketAddr>().ok().map(|s| s.ip()));
            match ip {
                // RFC 3881 network access point type 2: IP address.
                Some(ip) => {
                    user.push_attribute(attr("NetworkAccessPointID", &ip.to_string()));
                    user.push_attribute(attr("NetworkAccessPointTypeCode", "2"));
                }
                None => user.push_attribute(attr("NetworkAccessPointID", addr)),
            }
        }
        w.write_event(Event::Empty(user))?;
    }
    let app = BytesStart::new("ActiveParticipant").with_attributes([
        attr("UserID", source_id),
        attr("UserIsRequestor", if system { "true" } else { "false" }),
    ]);
    match role {
        Some((code, text)) => {
            w.write_event(Event::Start(app))?;
            w.write_event(Event::Empty(coded("RoleIDCode", code, "DCM", text)))?;
            w.write_event(Event::End(BytesEnd::new("ActiveParticipant")))?;
        }
        None => w.write_event(Event::Empty(app))?,
    }

    // Audit source: this application.
    w.write_event(Event::Start(
        BytesStart::new("AuditSourceIdentification")
            .with_attributes([attr("AuditSourceID", source_id)]),
    ))?;
    w.write_event(Event::Empty(coded(
        "AuditSourceTypeCode",
        "4",
        "DCM",
        "Application Server Process",
    )))?;
    w.write_event(Event::End(BytesEnd::new("AuditSourceIdentification")))?;

    // Participant objects.
    if let Some(study) = &e.study {
        // System object (2), role Report (3), Study Instance UID (DCM 110180).
        w.write_event(Event::Start(
            BytesStart::new("ParticipantObjectIdentification").with_attributes([
                attr("ParticipantObjectID", &study.to_string()),
                attr("ParticipantObjectTypeCode", "2"),
                attr("ParticipantObjectTypeCodeRole", "3"),
            ]),
        ))?;
        w.write_event(Event::Empty(coded(
            "ParticipantObjectIDTypeCode",
            "110180",
            "DCM",
            "Study Instance UID",
        )))?;
        w.write_event(Event::End(BytesEnd::new("ParticipantObjectIdentification")))?;
    }
    if let Some(patient) = &e.patient_id {
        // Person (1), role Patient (1), Patient Number (RFC 3881 code 2).
        w.write_event(Event::Start(
            BytesStart::new("ParticipantObjectIdentification").with_attributes([
                attr("ParticipantObjectID", patient),
                attr("ParticipantObjectTypeCode", "1"),
                attr("ParticipantObjectTypeCodeRole", "1"),
            ]),
        ))?;
        w.write_event(Event::Empty(coded(
            "ParticipantObjectIDTypeCode",
            "2",
            "RFC-3881",
            "Patient Number",
        )))?;
        w.write_event(Event::End(BytesEnd::new("ParticipantObjectIdentification")))?;
    }
    if let Some(session) = &e.session {
        // The upload session: a system object (2), role Job (20), local code.
        w.write_event(Event::Start(
            BytesStart::new("ParticipantObjectIdentification").with_attributes([
                attr("ParticipantObjectID", &session.to_string()),
                attr("ParticipantObjectTypeCode", "2"),
                attr("ParticipantObjectTypeCodeRole", "20"),
            ]),
        ))?;
        w.write_event(Event::Empty(coded(
            "ParticipantObjectIDTypeCode",
            "session",
            "99RELAYPACS",
            "RelayPACS upload session",
        )))?;
        if let Some(file) = &e.file {
            w.write_event(Event::Empty(
                BytesStart::new("ParticipantObjectDetail").with_attributes([
                    attr("type", "file"),
                    attr("value", &BASE64_STANDARD.encode(file.to_string())),
                ]),
            ))?;
        }
        w.write_event(Event::End(BytesEnd::new("ParticipantObjectIdentification")))?;
    }

    w.write_event(Event::End(BytesEnd::new("AuditMessage")))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failure must panic
mod tests {
    use super::*;
    use quick_xml::Reader;
    use relaypacs_core::{AuditOutcome, SessionId, Uid};
    use time::macros::datetime;

    fn ev(at: OffsetDateTime, action: AuditAction, user: &str) -> AuditEvent {
        let mut e = AuditEvent::new(user, action, AuditOutcome::Success);
        e.time = at;
        e
    }

    fn sample() -> Vec<AuditEvent> {
        let mut a = ev(
            datetime!(2026-01-01 10:00 UTC),
            AuditAction::FileCompleted,
            "alice<&>\"'",
        );
        a.address = Some("192.0.2.7:40000".into());
        a.study = Some(Uid::parse("1.2.840.113619.2.55.3").unwrap());
        a.patient_id = Some("PAT&1".into());
        a.session = Some(SessionId::random());
        a.detail = "quote \" apostrophe ' <tag> & amp\nnew line\ttab\u{1}ctl".into();
        let mut b = ev(datetime!(2026-01-01 11:00 UTC), AuditAction::Login, "bob");
        b.outcome = AuditOutcome::MinorFailure;
        let c = ev(
            datetime!(2026-01-01 12:00 UTC),
            AuditAction::ApplicationStop,
            "system",
        );
        vec![a, b, c]
    }

    /// One parsed `AuditMessage`: element names in order, with attributes,
    /// and the text of `EventOutcomeDescription`.
    #[derive(Debug, Default)]
    struct Msg {
        elements: Vec<(String, Vec<(String, String)>)>,
        description: String,
    }

    impl Msg {
        fn attr(&self, element: &str, key: &str) -> Vec<String> {
            self.elements
                .iter()
                .filter(|(n, _)| n == element)
                .filter_map(|(_, a)| a.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone()))
                .collect()
        }
    }

    /// Parse the document back; panics unless it is well-formed (matching
    /// end tags, valid escapes, one root).
    fn parse(xml: &[u8]) -> Vec<Msg> {
        let mut r = Reader::from_reader(xml);
        r.config_mut().check_end_names = true;
        let mut buf = Vec::new();
        let mut msgs: Vec<Msg> = Vec::new();
        let mut depth = 0usize;
        let mut roots = 0;
        let mut in_desc = false;
        loop {
            let ev = r.read_event_into(&mut buf).expect("well-formed XML");
            match ev {
                Event::Start(ref s) | Event::Empty(ref s) => {
                    let name = String::from_utf8(s.name().as_ref().to_vec()).unwrap();
                    if depth == 0 {
                        roots += 1;
                        assert_eq!(name, "AuditMessages");
                    }
                    if name == "AuditMessage" {
                        assert_eq!(depth, 1, "messages are children of the root");
                        msgs.push(Msg::default());
                    } else if depth >= 2 {
                        let attrs = s
                            .attributes()
                            .map(|a| {
                                let a = a.expect("valid attribute");
                                (
                                    String::from_utf8(a.key.as_ref().to_vec()).unwrap(),
                                    a.normalized_value(quick_xml::XmlVersion::Implicit1_0)
                                        .expect("valid escapes")
                                        .into_owned(),
                                )
                            })
                            .collect();
                        msgs.last_mut()
                            .unwrap()
                            .elements
                            .push((name.clone(), attrs));
                    }
                    in_desc = name == "EventOutcomeDescription";
                    if matches!(ev, Event::Start(_)) {
                        depth += 1;
                    }
                }
                Event::End(_) => {
                    depth -= 1;
                    in_desc = false;
                }
                Event::Text(t) if in_desc => {
                    msgs.last_mut().unwrap().description += &t.xml10_content().expect("valid text");
                }
                Event::GeneralRef(g) if in_desc => {
                    let text = match g.resolve_char_ref().expect("valid character reference") {
                        Some(c) => c.to_string(),
                        None => {
                            let name = g.decode().unwrap();
                            quick_xml::escape::resolve_predefined_entity(&name)
                                .expect("a predefined entity")
                                .to_string()
                        }
                    };
                    msgs.last_mut().unwrap().description += &text;
                }
                Event::Eof => break,
                _ => {}
            }
            buf.clear();
        }
        assert_eq!(depth, 0, "every element closed");
        assert_eq!(roots, 1, "one root element");
        msgs
    }

    #[test]
    fn dicom_xml_is_well_formed_with_one_message_per_event() {
        let events = sample();
        let xml = export_events(
            &events,
            TimeRange::default(),
            ExportFormat::DicomXml,
            "relay&1",
        )
        .unwrap();
        let msgs = parse(&xml);
        assert_eq!(msgs.len(), 3);

        let a = &msgs[0];
        assert_eq!(a.attr("EventID", "csd-code"), ["110107"]);
        assert_eq!(a.attr("EventID", "codeSystemName"), ["DCM"]);
        assert_eq!(a.attr("EventID", "originalText"), ["Import"]);
        assert_eq!(a.attr("EventIdentification", "EventActionCode"), ["C"]);
        assert_eq!(
            a.attr("EventIdentification", "EventDateTime"),
            ["2026-01-01T10:00:00Z"]
        );
        assert_eq!(
            a.attr("EventIdentification", "EventOutcomeIndicator"),
            ["0"]
        );
        // The user, then this application; special characters round-trip.
        assert_eq!(
            a.attr("ActiveParticipant", "UserID"),
            ["alice<&>\"'", "relay&1"]
        );
        assert_eq!(
            a.attr("ActiveParticipant", "UserIsRequestor"),
            ["true", "false"]
        );
        assert_eq!(
            a.attr("ActiveParticipant", "NetworkAccessPointID"),
            ["192.0.2.7"]
        );
        assert_eq!(
            a.attr("ActiveParticipant", "NetworkAccessPointTypeCode"),
            ["2"]
        );
        assert_eq!(
            a.attr("AuditSourceIdentification", "AuditSourceID"),
            ["relay&1"]
        );
        assert_eq!(a.attr("AuditSourceTypeCode", "csd-code"), ["4"]);
        assert_eq!(
            a.attr("ParticipantObjectIdentification", "ParticipantObjectID")[..2],
            ["1.2.840.113619.2.55.3".to_string(), "PAT&1".to_string()]
        );
        assert_eq!(
            a.attr("ParticipantObjectIDTypeCode", "csd-code"),
            ["110180", "2", "session"]
        );
        assert_eq!(
            a.attr(
                "ParticipantObjectIdentification",
                "ParticipantObjectTypeCode"
            )[..2],
            ["2".to_string(), "1".to_string()]
        );
        // Free text intact, the control character XML cannot carry replaced.
        assert_eq!(
            a.description,
            "file_completed: quote \" apostrophe ' <tag> & amp\nnew line\ttab\u{FFFD}ctl"
        );
        // Order of the schema: event, participants, source, objects.
        let order: Vec<&str> = a
            .elements
            .iter()
            .map(|(n, _)| n.as_str())
            .filter(|n| {
                [
                    "EventIdentification",
                    "ActiveParticipant",
                    "AuditSourceIdentification",
                    "ParticipantObjectIdentification",
                ]
                .contains(n)
            })
            .collect();
        assert_eq!(
            order,
            [
                "EventIdentification",
                "ActiveParticipant",
                "ActiveParticipant",
                "AuditSourceIdentification",
                "ParticipantObjectIdentification",
                "ParticipantObjectIdentification",
                "ParticipantObjectIdentification",
            ]
        );

        let b = &msgs[1];
        assert_eq!(b.attr("EventID", "csd-code"), ["110114"]);
        assert_eq!(b.attr("EventTypeCode", "csd-code"), ["110122"]);
        assert_eq!(
            b.attr("EventIdentification", "EventOutcomeIndicator"),
            ["4"]
        );
        assert_eq!(b.attr("EventIdentification", "EventActionCode"), ["E"]);
        assert!(
            b.attr("ParticipantObjectIdentification", "ParticipantObjectID")
                .is_empty()
        );

        // A system event: the application alone is the requestor.
        let c = &msgs[2];
        assert_eq!(c.attr("EventID", "csd-code"), ["110100"]);
        assert_eq!(c.attr("EventTypeCode", "csd-code"), ["110121"]);
        assert_eq!(c.attr("ActiveParticipant", "UserID"), ["relay&1"]);
        assert_eq!(c.attr("ActiveParticipant", "UserIsRequestor"), ["true"]);
        assert_eq!(c.attr("RoleIDCode", "csd-code"), ["110150"]);
    }

    #[test]
    fn time_range_takes_from_inclusive_to_exclusive() {
        let events = sample();
        let range = TimeRange {
            from: Some(datetime!(2026-01-01 11:00 UTC)),
            to: Some(datetime!(2026-01-01 12:00 UTC)),
        };
        let xml = export_events(&events, range, ExportFormat::DicomXml, "r").unwrap();
        let msgs = parse(&xml);
        assert_eq!(msgs.len(), 1);
        assert_eq!(msgs[0].attr("EventID", "csd-code"), ["110114"]);

        let jl = export_events(&events, range, ExportFormat::Jsonl, "r").unwrap();
        let back: Vec<AuditEvent> = String::from_utf8(jl)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(back, [events[1].clone()]);

        let open_end = TimeRange {
            from: Some(datetime!(2026-01-01 10:30 UTC)),
            to: None,
        };
        assert_eq!(
            parse(&export_events(&events, open_end, ExportFormat::DicomXml, "r").unwrap()).len(),
            2
        );
        let nothing = TimeRange {
            from: Some(datetime!(2027-01-01 0:00 UTC)),
            to: None,
        };
        assert!(
            parse(&export_events(&events, nothing, ExportFormat::DicomXml, "r").unwrap())
                .is_empty()
        );
        assert!(
            export_events(&events, nothing, ExportFormat::Jsonl, "r")
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn jsonl_round_trips_every_field() {
        let events = sample();
        let jl = export_events(&events, TimeRange::default(), ExportFormat::Jsonl, "r").unwrap();
        let back: Vec<AuditEvent> = String::from_utf8(jl)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(back, events);
    }

    #[test]
    fn format_names_parse() {
        assert_eq!(
            "dicom-xml".parse::<ExportFormat>(),
            Ok(ExportFormat::DicomXml)
        );
        assert_eq!("jsonl".parse::<ExportFormat>(), Ok(ExportFormat::Jsonl));
        assert!("xml".parse::<ExportFormat>().is_err());
    }
}
