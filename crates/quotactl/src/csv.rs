//! The allocation files of `alloc import`, `alloc bulk` and `alloc export`: parsing, with every
//! line checked and every problem reported, and writing. No I/O here: callers read and write
//! the bytes, so the rules are tested alone.
//!
//! `::csv` below is the csv crate, which this module (named for the files it handles) wraps.

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::fmt;

use quotad_core::{ServiceType, TeacherId};
use quotad_proto::v1::{Allocation, AllocationSpec};

/// The first line, in this column order: export writes it and import requires it.
pub const HEADER: [&str; 5] = [
    "teacher_id",
    "service_type",
    "allocated_units",
    "priority",
    "auto_renew",
];

/// Most slices in one file. They all go in one BulkSetAllocations message, which this keeps
/// well under gRPC's default 4 MiB message limit (a slice is at most about 230 bytes).
pub const ALLOCATIONS_MAX: usize = 10_000;

/// Largest file read, so that a wrong file (a log, an image) is refused before parsing.
pub const FILE_BYTES_MAX: u64 = 4 * 1024 * 1024;

/// One bad line and everything wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LineError {
    /// 1-based; the header is line 1. A quoted field may span lines: this is the first.
    pub line: u64,
    pub problems: Vec<String>,
}

impl fmt::Display for LineError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}: {}", self.line, self.problems.join("; "))
    }
}

fn line_error(line: u64, problem: impl Into<String>) -> LineError {
    LineError {
        line,
        problems: vec![problem.into()],
    }
}

/// [`parse`] for bytes that should be UTF-8 text.
pub fn parse_bytes(bytes: &[u8]) -> Result<Vec<AllocationSpec>, Vec<LineError>> {
    match std::str::from_utf8(bytes) {
        Ok(text) => parse(text),
        Err(error) => {
            let valid = bytes.get(..error.valid_up_to()).unwrap_or_default();
            let line = 1 + valid.iter().filter(|&&byte| byte == b'\n').count() as u64;
            Err(vec![line_error(
                line,
                "is not UTF-8 text; save the file as \"CSV UTF-8\"",
            )])
        }
    }
}

/// The slices of a whole file, or every bad line of it. A UTF-8 byte order mark, blank
/// lines, CRLF line ends, quoted fields and spaces around fields are accepted.
pub fn parse(text: &str) -> Result<Vec<AllocationSpec>, Vec<LineError>> {
    let mut reader = ::csv::ReaderBuilder::new()
        .has_headers(false)
        // A line with too few or too many fields is reported by check_row, not as a
        // reader error that would stop the parsing.
        .flexible(true)
        .trim(::csv::Trim::All)
        .from_reader(text.as_bytes());
    let mut lines = LineCounter::new(text);
    let mut errors = Vec::new();
    let mut allocations = Vec::new();
    let mut first_line_of_slice = HashMap::new();
    let mut too_many_reported = false;
    let mut header_seen = false;
    for record in reader.records() {
        let (line, record) = match record {
            Ok(record) => (lines.line_at(record.position()), record),
            Err(error) => {
                let line = lines.line_at(error.position());
                errors.push(line_error(line, error.to_string()));
                header_seen = true;
                continue;
            }
        };
        if !header_seen {
            header_seen = true;
            errors.extend(check_header(&record, line));
            continue;
        }
        match check_row(&record, line, &mut first_line_of_slice) {
            Ok(allocation) if allocations.len() < ALLOCATIONS_MAX => allocations.push(allocation),
            // Reported once, at the first slice too many; later lines are still checked.
            Ok(_) if !too_many_reported => {
                too_many_reported = true;
                errors.push(line_error(
                    line,
                    format!(
                        "more than {ALLOCATIONS_MAX} slices; split the file (each file is \
                         one all-or-nothing call)"
                    ),
                ));
            }
            Ok(_) => {}
            Err(problems) => errors.push(LineError { line, problems }),
        }
    }
    if !header_seen {
        let expected = HEADER.join(",");
        errors.push(line_error(
            1,
            format!("the file is empty; expected the header {expected}"),
        ));
    }
    if errors.is_empty() && allocations.is_empty() {
        errors.push(line_error(1, "no slices follow the header"));
    }
    if errors.is_empty() {
        Ok(allocations)
    } else {
        errors.sort_by_key(|error| error.line);
        Err(errors)
    }
}

fn check_header(header: &::csv::StringRecord, line: u64) -> Option<LineError> {
    if header.iter().eq(HEADER) {
        return None;
    }
    Some(line_error(
        line,
        format!(
            "the header is {:?}; expected {:?}",
            header.iter().collect::<Vec<_>>().join(","),
            HEADER.join(",")
        ),
    ))
}

/// Line numbers of records, counted from their byte offsets. The reader's own line count
/// is taken where it began reading a record, before the line breaks it then skips (the
/// `\n` of a CRLF, blank lines), so it can name the line before the record.
struct LineCounter<'a> {
    text: &'a [u8],
    /// Where the last count stopped, and the line there; records come in order, so each
    /// count starts where the last one ended and a whole file costs one pass.
    byte: usize,
    line: u64,
}

impl<'a> LineCounter<'a> {
    fn new(text: &'a str) -> Self {
        Self {
            text: text.as_bytes(),
            byte: 0,
            line: 1,
        }
    }

    /// The 1-based line the record at `position` starts on (0 if the reader gave none).
    fn line_at(&mut self, position: Option<&::csv::Position>) -> u64 {
        let Some(position) = position else {
            return 0;
        };
        let start = usize::try_from(position.byte())
            .unwrap_or(usize::MAX)
            .clamp(self.byte, self.text.len());
        let rest = self.text.get(start..).unwrap_or_default();
        let first = rest
            .iter()
            .position(|&byte| byte != b'\r' && byte != b'\n')
            .map_or(self.text.len(), |offset| start + offset);
        let skipped = self.text.get(self.byte..first).unwrap_or_default();
        self.line += skipped.iter().filter(|&&byte| byte == b'\n').count() as u64;
        self.byte = first;
        self.line
    }
}

/// One slice, or everything wrong with its line.
fn check_row(
    record: &::csv::StringRecord,
    line: u64,
    first_line_of_slice: &mut HashMap<(String, String), u64>,
) -> Result<AllocationSpec, Vec<String>> {
    let fields: Vec<&str> = record.iter().collect();
    let [teacher_id, service_type, units, priority, auto_renew] = fields.as_slice() else {
        return Err(vec![format!(
            "has {} field{}; expected {} ({})",
            fields.len(),
            if fields.len() == 1 { "" } else { "s" },
            HEADER.len(),
            HEADER.join(",")
        )]);
    };
    let mut problems = Vec::new();
    let teacher_id = noted(&mut problems, TeacherId::parse(teacher_id));
    let service_type = noted(&mut problems, ServiceType::parse(service_type));
    let units = noted(&mut problems, parse_units(units));
    let priority = noted(&mut problems, parse_priority(priority));
    let auto_renew = noted(&mut problems, parse_auto_renew(auto_renew));
    if let (Some(teacher_id), Some(service_type)) = (&teacher_id, &service_type) {
        let key = (teacher_id.to_string(), service_type.to_string());
        match first_line_of_slice.entry(key) {
            Entry::Occupied(first) => problems.push(format!(
                "teacher {teacher_id} and service type {service_type} are already on line \
                 {}; each pair may appear once",
                first.get()
            )),
            Entry::Vacant(vacant) => {
                vacant.insert(line);
            }
        }
    }
    match (teacher_id, service_type, units, priority, auto_renew) {
        (Some(teacher_id), Some(service_type), Some(units), Some(priority), Some(auto_renew))
            if problems.is_empty() =>
        {
            Ok(AllocationSpec {
                teacher_id: teacher_id.to_string(),
                service_type: service_type.to_string(),
                allocated_units: units,
                priority: priority.to_string(),
                // Sent even when false, like the priority: the file states the slice in full.
                auto_renew: Some(auto_renew),
            })
        }
        _ => Err(problems),
    }
}

/// The value, or `None` with its problem noted.
fn noted<T, E: fmt::Display>(problems: &mut Vec<String>, result: Result<T, E>) -> Option<T> {
    result
        .map_err(|error| problems.push(error.to_string()))
        .ok()
}

fn parse_units(text: &str) -> Result<u64, String> {
    if text.is_empty() {
        return Err("allocated_units is empty; expected a whole number of units".to_string());
    }
    text.parse().map_err(|_| {
        format!(
            "allocated_units is {text:?}; expected a whole number of units (0 to {})",
            u64::MAX
        )
    })
}

/// The wire name; empty is "normal", sent as such so that a file states every slice in
/// full rather than depending on what the server has now.
fn parse_priority(text: &str) -> Result<&'static str, String> {
    match text.to_ascii_lowercase().as_str() {
        "" | "normal" => Ok("normal"),
        "low" => Ok("low"),
        "high" => Ok("high"),
        _ => Err(format!(
            "priority is {text:?}; expected low, normal or high (empty: normal)"
        )),
    }
}

/// Empty is false, sent as such (as for the priority): a file states every slice in full.
fn parse_auto_renew(text: &str) -> Result<bool, String> {
    match text.to_ascii_lowercase().as_str() {
        "" | "false" | "0" | "no" => Ok(false),
        "true" | "1" | "yes" => Ok(true),
        _ => Err(format!(
            "auto_renew is {text:?}; expected true, false, 1, 0, yes or no (empty: false)"
        )),
    }
}

/// The header and one line per slice, in the given order: what [`parse`] reads back.
pub fn write(allocations: &[Allocation]) -> Result<Vec<u8>, ::csv::Error> {
    let mut writer = ::csv::Writer::from_writer(Vec::new());
    writer.write_record(HEADER)?;
    for allocation in allocations {
        let units = allocation.allocated_units.to_string();
        writer.write_record([
            allocation.teacher_id.as_str(),
            allocation.service_type.as_str(),
            units.as_str(),
            allocation.priority.as_str(),
            if allocation.auto_renew {
                "true"
            } else {
                "false"
            },
        ])?;
    }
    writer
        .into_inner()
        .map_err(|error| ::csv::Error::from(error.into_error()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "teacher_id,service_type,allocated_units,priority,auto_renew\n\
                        t1,claude_messages,100,high,true\n\
                        t1,lesson_generation,50,,\n\
                        t2,claude_messages,0,Low,NO\n";

    fn spec(
        teacher: &str,
        service: &str,
        units: u64,
        priority: &str,
        renew: bool,
    ) -> AllocationSpec {
        AllocationSpec {
            teacher_id: teacher.to_string(),
            service_type: service.to_string(),
            allocated_units: units,
            priority: priority.to_string(),
            auto_renew: Some(renew),
        }
    }

    fn allocation(
        teacher: &str,
        service: &str,
        units: u64,
        priority: &str,
        renew: bool,
    ) -> Allocation {
        Allocation {
            school_id: "s1".to_string(),
            teacher_id: teacher.to_string(),
            service_type: service.to_string(),
            allocated_units: units,
            used_units: 7,
            reserved_units: 3,
            priority: priority.to_string(),
            auto_renew: renew,
            status: "active".to_string(),
        }
    }

    fn lines_of(errors: &[LineError]) -> Vec<u64> {
        errors.iter().map(|error| error.line).collect()
    }

    #[test]
    fn a_good_file_parses_with_defaults_filled_in() {
        let parsed = parse(GOOD).unwrap();
        assert_eq!(
            parsed,
            vec![
                spec("t1", "claude_messages", 100, "high", true),
                spec("t1", "lesson_generation", 50, "normal", false),
                spec("t2", "claude_messages", 0, "low", false),
            ]
        );
    }

    #[test]
    fn every_bad_line_is_reported_with_its_number_and_problem() {
        let text = "teacher_id,service_type,allocated_units,priority,auto_renew\n\
                    t1,claude_messages,100,high,true\n\
                    t2,Claude,ten,urgent,maybe\n\
                    ,claude_messages,5,,\n\
                    t3,claude_messages\n\
                    t1,claude_messages,20,low,no\n\
                    t4,claude_messages,-1,,\n\
                    t5,claude_messages,18446744073709551616,,\n";
        let errors = parse(text).unwrap_err();
        assert_eq!(lines_of(&errors), vec![3, 4, 5, 6, 7, 8]);
        // Line 3 has four problems, each reported.
        assert_eq!(errors[0].problems.len(), 4, "{:?}", errors[0]);
        let line_3 = errors[0].to_string();
        assert!(
            line_3.starts_with("line 3: service_type contains 'C'"),
            "{line_3}"
        );
        assert!(line_3.contains("allocated_units is \"ten\""), "{line_3}");
        assert!(line_3.contains("priority is \"urgent\""), "{line_3}");
        assert!(line_3.contains("auto_renew is \"maybe\""), "{line_3}");
        assert_eq!(errors[1].problems, vec!["teacher_id must not be empty"]);
        assert!(errors[2].problems[0].starts_with("has 2 fields; expected 5"));
        assert!(
            errors[3].problems[0].contains("already on line 2"),
            "{:?}",
            errors[3]
        );
        assert!(errors[4].problems[0].contains("\"-1\""));
        assert!(errors[5].problems[0].contains("whole number"));
    }

    #[test]
    fn a_wrong_header_is_reported_and_the_rows_still_checked() {
        let errors = parse("teacher,service,units\nt1,claude_messages,x,,\n").unwrap_err();
        assert_eq!(lines_of(&errors), vec![1, 2]);
        assert!(errors[0].problems[0].starts_with("the header is \"teacher,service,units\""));
    }

    #[test]
    fn empty_files_and_header_only_files_are_refused() {
        assert_eq!(lines_of(&parse("").unwrap_err()), vec![1]);
        let errors =
            parse("teacher_id,service_type,allocated_units,priority,auto_renew\n").unwrap_err();
        assert_eq!(errors[0].problems, vec!["no slices follow the header"]);
    }

    #[test]
    fn bom_crlf_blank_lines_and_a_missing_final_newline_are_tolerated() {
        let text = "\u{feff}teacher_id,service_type,allocated_units,priority,auto_renew\r\n\
                    t1,claude_messages,100,high,true\r\n\
                    \r\n\
                    t2,claude_messages,5,,";
        let parsed = parse(text).unwrap();
        assert_eq!(parsed.len(), 2);
        assert_eq!(parsed[0].teacher_id, "t1");
        // Line numbers still count the blank line.
        let bad = text.replace("t2,claude_messages,5", "t2,claude_messages,five");
        assert_eq!(lines_of(&parse(&bad).unwrap_err()), vec![4]);
        assert_eq!(parse(&format!("{GOOD}\n\n")).unwrap().len(), 3);
    }

    #[test]
    fn blank_lines_do_not_shift_line_numbers() {
        let text = "\n\nteacher_id,service_type,allocated_units\n\n\nt1,x,1,,maybe\n";
        let errors = parse(text).unwrap_err();
        assert_eq!(lines_of(&errors), vec![3, 6]);
    }

    #[test]
    fn quoted_fields_are_read_and_lines_counted_across_them() {
        let text =
            "\"teacher_id\",\"service_type\",\"allocated_units\",\"priority\",\"auto_renew\"\n\
                    \"t1\",\"claude_messages\",\"100\",\"high\",\"true\"\n\
                    \"t 2\nx\",claude_messages,5,,\n\
                    t3,claude_messages,5,,oops\n";
        let errors = parse(text).unwrap_err();
        // The quoted field spans lines 3 and 4; the next record starts on line 5.
        assert_eq!(lines_of(&errors), vec![3, 5]);
        let good = "teacher_id,service_type,allocated_units,priority,auto_renew\n\
                    \"t1\",\"claude_messages\",\" 100 \",\"\",\"\"\n";
        assert_eq!(
            parse(good).unwrap(),
            vec![spec("t1", "claude_messages", 100, "normal", false)]
        );
    }

    #[test]
    fn export_then_parse_round_trips() {
        let allocations = vec![
            allocation("t1", "claude_messages", 100, "high", true),
            allocation("t1", "lesson_generation", 0, "normal", false),
            allocation("a.b-c:d@e_f", "x", u64::MAX, "low", true),
        ];
        let written = write(&allocations).unwrap();
        let text = String::from_utf8(written).unwrap();
        assert!(text.starts_with("teacher_id,service_type,allocated_units,priority,auto_renew\n"));
        let parsed = parse(&text).unwrap();
        let expected: Vec<AllocationSpec> = allocations
            .iter()
            .map(|a| {
                spec(
                    &a.teacher_id,
                    &a.service_type,
                    a.allocated_units,
                    &a.priority,
                    a.auto_renew,
                )
            })
            .collect();
        assert_eq!(parsed, expected);
        // And the file written again from the parsed slices is the same file.
        let again: Vec<Allocation> = parsed
            .iter()
            .map(|s| {
                allocation(
                    &s.teacher_id,
                    &s.service_type,
                    s.allocated_units,
                    &s.priority,
                    s.auto_renew == Some(true),
                )
            })
            .collect();
        assert_eq!(String::from_utf8(write(&again).unwrap()).unwrap(), text);
    }

    #[test]
    fn bytes_that_are_not_utf8_are_reported_with_their_line() {
        let mut bytes = GOOD.as_bytes().to_vec();
        bytes.extend_from_slice(b"t\xe9,claude_messages,1,,\n");
        let errors = parse_bytes(&bytes).unwrap_err();
        assert_eq!(lines_of(&errors), vec![5]);
        assert!(errors[0].problems[0].contains("not UTF-8"));
    }

    #[test]
    fn more_slices_than_the_limit_are_refused_once() {
        let mut text = HEADER.join(",");
        for teacher in 0..=ALLOCATIONS_MAX + 1 {
            text += &format!("\nt{teacher},claude_messages,1,,");
        }
        let errors = parse(&text).unwrap_err();
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].line, ALLOCATIONS_MAX as u64 + 2);
    }
}
