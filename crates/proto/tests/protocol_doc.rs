//! PROTOCOL.md and the code agree: the code table, the kinds table, the error
//! code table and the limits table are compared with `codes::ALL`,
//! `ParamKind::ALL`, `ErrorCode::ALL` and `Limits::default()` in both
//! directions, and every example block is compared with what the encoder and
//! `signed_message` produce. Edit either side alone and this fails.

mod common;

use std::collections::BTreeSet;

use bytes::BytesMut;
use oclocks_proto::*;

fn doc() -> String {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../PROTOCOL.md");
    std::fs::read_to_string(path).expect("PROTOCOL.md at the repository root")
}

/// The text between `<!-- NAME:begin -->` and `<!-- NAME:end -->`.
fn section<'a>(doc: &'a str, name: &str) -> &'a str {
    let begin = format!("<!-- {name}:begin -->");
    let end = format!("<!-- {name}:end -->");
    let start = doc.find(&begin).unwrap_or_else(|| panic!("no {begin}")) + begin.len();
    let stop = doc[start..]
        .find(&end)
        .unwrap_or_else(|| panic!("no {end}"))
        + start;
    &doc[start..stop]
}

/// The body rows of the markdown table in `text`, as trimmed cells with
/// backticks removed.
fn rows(text: &str) -> Vec<Vec<String>> {
    text.lines()
        .map(str::trim)
        .filter(|l| l.starts_with('|'))
        .skip(2) // header and separator
        .map(|l| {
            l.trim_matches('|')
                .split('|')
                .map(|c| c.trim().replace('`', ""))
                .collect()
        })
        .collect()
}

fn parse_hex_u16(s: &str) -> u16 {
    u16::from_str_radix(s.trim_start_matches("0x"), 16).unwrap_or_else(|_| panic!("bad code {s}"))
}

/// Compare two sets, listing what each side lacks.
fn same<T: Ord + std::fmt::Debug>(what: &str, doc: BTreeSet<T>, code: BTreeSet<T>) {
    let only_doc: Vec<_> = doc.difference(&code).collect();
    let only_code: Vec<_> = code.difference(&doc).collect();
    assert!(
        only_doc.is_empty() && only_code.is_empty(),
        "{what}: in PROTOCOL.md only: {only_doc:?}; in the code only: {only_code:?}"
    );
}

#[test]
fn code_table_matches() {
    let doc = doc();
    let rows = rows(section(&doc, "codes"));
    let in_doc: BTreeSet<(String, u16, String, String)> = rows
        .iter()
        .map(|r| {
            (
                r[0].clone(),
                parse_hex_u16(&r[1]),
                r[2].clone(),
                r[3].clone(),
            )
        })
        .collect();
    assert_eq!(in_doc.len(), rows.len(), "a row is repeated");
    let in_code: BTreeSet<(String, u16, String, String)> = codes::ALL
        .iter()
        .map(|c| {
            (
                c.name.to_owned(),
                c.value,
                c.table_kind().to_owned(),
                c.group.to_owned(),
            )
        })
        .collect();
    same("codes", in_doc, in_code);
}

#[test]
fn kinds_table_matches() {
    let doc = doc();
    let in_doc: BTreeSet<(u16, String)> = rows(section(&doc, "kinds"))
        .iter()
        .map(|r| {
            let start = r[0].split('–').next().unwrap_or_default();
            (parse_hex_u16(start), r[1].clone())
        })
        .collect();
    let in_code: BTreeSet<(u16, String)> = ParamKind::ALL
        .iter()
        .enumerate()
        .map(|(i, k)| ((i as u16) << 12, k.name().to_owned()))
        .collect();
    same("kinds", in_doc, in_code);
    for start in [0x0000u16, 0x7000, 0xb000, 0xc000, 0xd000, 0xffff] {
        let _ = ParamKind::of(start);
    }
    assert_eq!(ParamKind::of(0xffff), ParamKind::Entry);
}

#[test]
fn error_table_matches() {
    let doc = doc();
    let in_doc: BTreeSet<(String, u16)> = rows(section(&doc, "errors"))
        .iter()
        .map(|r| (r[0].clone(), r[1].parse().expect("error value")))
        .collect();
    let in_code: BTreeSet<(String, u16)> = ErrorCode::ALL
        .iter()
        .map(|c| (c.name().to_owned(), c.to_u16()))
        .collect();
    same("error codes", in_doc, in_code);
}

#[test]
fn limits_table_matches() {
    let doc = doc();
    let in_doc: BTreeSet<(String, usize)> = rows(section(&doc, "limits"))
        .iter()
        .map(|r| (r[0].clone(), r[1].parse().expect("limit value")))
        .collect();
    let in_code: BTreeSet<(String, usize)> = Limits::default()
        .table()
        .iter()
        .map(|(n, v)| ((*n).to_owned(), *v))
        .collect();
    same("limits", in_doc, in_code);
}

/// Every upper-case name in backticks anywhere in the document is a code or
/// an error code, so the prose cannot name a field that does not exist.
#[test]
fn prose_names_only_existing_codes() {
    let doc = doc();
    let known: BTreeSet<&str> = codes::ALL
        .iter()
        .map(|c| c.name)
        .chain(ErrorCode::ALL.iter().map(|c| c.name()))
        .collect();
    let mut unknown = BTreeSet::new();
    for (i, chunk) in doc.split('`').enumerate() {
        let is_name = i % 2 == 1
            && chunk.len() > 1
            && chunk.chars().all(|c| c.is_ascii_uppercase() || c == '_')
            && chunk.chars().next().is_some_and(|c| c.is_ascii_uppercase());
        if is_name && !known.contains(chunk) {
            unknown.insert(chunk.to_owned());
        }
    }
    // Reserved future actions are named in prose as such.
    for reserved in ["GET", "PUT", "DEL"] {
        unknown.remove(reserved);
    }
    assert!(
        unknown.is_empty(),
        "PROTOCOL.md names unknown codes: {unknown:?}"
    );
}

/// The bytes of the code block after `<!-- example:NAME -->`: per line, hex
/// tokens and `'ascii'` tokens up to the first other word (the comment).
fn example(doc: &str, name: &str) -> Vec<u8> {
    let marker = format!("<!-- example:{name} -->");
    let start = doc.find(&marker).unwrap_or_else(|| panic!("no {marker}")) + marker.len();
    let block = &doc[start..];
    let open = block.find("```").expect("code block") + 3;
    let block = &block[open..];
    let block = &block[block.find('\n').unwrap_or(0)..];
    let block = &block[..block.find("```").expect("closing fence")];
    let mut out = Vec::new();
    for line in block.lines() {
        let mut rest = line.trim_start();
        while !rest.is_empty() {
            if let Some(quoted) = rest.strip_prefix('\'') {
                let end = quoted.find('\'').expect("closing quote");
                out.extend_from_slice(&quoted.as_bytes()[..end]);
                rest = quoted[end + 1..].trim_start();
                continue;
            }
            let word = rest.split_whitespace().next().unwrap_or_default();
            let is_hex = word.len() % 2 == 0 && word.chars().all(|c| c.is_ascii_hexdigit());
            if !is_hex {
                break;
            }
            for i in (0..word.len()).step_by(2) {
                out.push(u8::from_str_radix(&word[i..i + 2], 16).expect("hex"));
            }
            rest = rest[word.len()..].trim_start();
        }
    }
    out
}

fn encode_response(r: &Response) -> Vec<u8> {
    let mut buf = BytesMut::new();
    r.encode(&mut buf, &Limits::default()).unwrap();
    buf.to_vec()
}

#[test]
fn examples_match() {
    let doc = doc();
    let lock = common::example_lock_request();
    let mut buf = BytesMut::new();
    lock.encode(&mut buf, &Limits::default()).unwrap();
    assert_eq!(example(&doc, "lock-request"), buf.to_vec(), "lock-request");
    assert_eq!(buf.len(), 190, "the prose says 190 bytes");

    let ok = Response {
        id: 7,
        body: ResponseBody::Ok(OkReply {
            token: Some(1001),
            expires_in_ms: Some(30_000),
            ..OkReply::default()
        }),
    };
    assert_eq!(example(&doc, "lock-ok"), encode_response(&ok), "lock-ok");

    let locked = common::example_locked_error();
    assert_eq!(
        example(&doc, "locked-error"),
        encode_response(&locked),
        "locked-error"
    );

    let cluster_id: [u8; 16] = std::array::from_fn(|i| i as u8);
    let signed = signed_message(
        &cluster_id,
        SigOp::Lock,
        "default",
        "acct:4587",
        42,
        30_000,
        1,
    );
    assert_eq!(example(&doc, "signed-message"), signed, "signed-message");
    assert_eq!(signed.len(), 106, "the prose says 106 bytes");
}
