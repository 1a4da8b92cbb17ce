//! `alloc set|suspend|reactivate|remove|list|bulk|import|export`: teachers' slices, one at a
//! time or a whole CSV file in one all-or-nothing call.

use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use quotad_proto::v1::{
    Allocation, AllocationSpec, BulkSetAllocationsRequest, BulkSetAllocationsResponse,
    ListAllocationsRequest, ListAllocationsResponse, RemoveAllocationRequest, SetAllocationRequest,
    SetAllocationStatusRequest,
};
use serde_json::{json, Value};
use tonic::Status;

use crate::cli::{
    AllocCommand, AllocExportArgs, AllocListArgs, AllocSetArgs, AllocSliceArgs, Audit, OnOff,
};
use crate::connect::{AdminClient, Server};
use crate::csv;
use crate::error::CliError;
use crate::output::{list_json, on_off, plural, show, table, Output, Render, ToJson};

/// Runs one `alloc` subcommand. `import` and `bulk` check their file before connecting;
/// `export` prints CSV (a JSON array with --json), or a summary when it writes a file.
pub async fn run_alloc(
    server: &Server,
    command: AllocCommand,
    json: bool,
) -> Result<Output, CliError> {
    let rendered = match command {
        AllocCommand::Set(args) => show(set_allocation(server.admin().await?, args).await?, json),
        AllocCommand::Suspend(args) => {
            let admin = server.admin().await?;
            show(set_allocation_status(admin, args, "suspended").await?, json)
        }
        AllocCommand::Reactivate(args) => {
            let admin = server.admin().await?;
            show(set_allocation_status(admin, args, "active").await?, json)
        }
        AllocCommand::Remove(args) => {
            show(remove_allocation(server.admin().await?, args).await?, json)
        }
        AllocCommand::List(args) => {
            show(list_allocations(server.admin().await?, args).await?, json)
        }
        AllocCommand::Bulk(args) => show(
            import_allocations(server, args.school_id, &args.file, args.audit).await?,
            json,
        ),
        AllocCommand::Import(args) => show(
            import_allocations(server, args.school_id, &args.file, args.audit).await?,
            json,
        ),
        AllocCommand::Export(args) => {
            return export_allocations(server.admin().await?, args, json).await;
        }
    };
    Ok(Output::text(rendered))
}

async fn set_allocation(mut admin: AdminClient, args: AllocSetArgs) -> Result<Allocation, Status> {
    let request = SetAllocationRequest {
        school_id: args.slice.school_id,
        teacher_id: args.slice.teacher_id,
        service_type: args.slice.service_type,
        allocated_units: args.units,
        // Left out (empty, unset), each keeps the slice's current value.
        priority: args
            .priority
            .map_or_else(String::new, |p| p.wire_name().to_string()),
        auto_renew: args.auto_renew.map(OnOff::is_on),
        changed_by: args.audit.changed_by.unwrap_or_default(),
        reason: args.audit.reason.unwrap_or_default(),
    };
    Ok(admin.set_allocation(request).await?.into_inner())
}

async fn set_allocation_status(
    mut admin: AdminClient,
    args: AllocSliceArgs,
    status: &str,
) -> Result<Allocation, Status> {
    let request = SetAllocationStatusRequest {
        school_id: args.slice.school_id,
        teacher_id: args.slice.teacher_id,
        service_type: args.slice.service_type,
        status: status.to_string(),
        changed_by: args.audit.changed_by.unwrap_or_default(),
        reason: args.audit.reason.unwrap_or_default(),
    };
    Ok(admin.set_allocation_status(request).await?.into_inner())
}

/// A slice just removed; shown as a removal rather than as a live slice.
struct RemovedAllocation(Allocation);

async fn remove_allocation(
    mut admin: AdminClient,
    args: AllocSliceArgs,
) -> Result<RemovedAllocation, Status> {
    let request = RemoveAllocationRequest {
        school_id: args.slice.school_id,
        teacher_id: args.slice.teacher_id,
        service_type: args.slice.service_type,
        changed_by: args.audit.changed_by.unwrap_or_default(),
        reason: args.audit.reason.unwrap_or_default(),
    };
    let removed = admin.remove_allocation(request).await?.into_inner();
    Ok(RemovedAllocation(removed))
}

async fn list_allocations(
    mut admin: AdminClient,
    args: AllocListArgs,
) -> Result<ListAllocationsResponse, Status> {
    let request = ListAllocationsRequest {
        school_id: args.school_id,
        teacher_id: args.teacher_id.unwrap_or_default(),
        service_type: args.service_type.unwrap_or_default(),
    };
    Ok(admin.list_allocations(request).await?.into_inner())
}

/// Reads an allocation CSV file, bounded in size, and checks every line of it.
fn read_allocation_file(path: &Path) -> Result<Vec<AllocationSpec>, CliError> {
    let read_error = |error| CliError::ReadFile {
        path: path.to_path_buf(),
        error,
    };
    let file = File::open(path).map_err(read_error)?;
    let mut bytes = Vec::new();
    file.take(csv::FILE_BYTES_MAX + 1)
        .read_to_end(&mut bytes)
        .map_err(read_error)?;
    if bytes.len() as u64 > csv::FILE_BYTES_MAX {
        return Err(CliError::Usage(format!(
            "{} is larger than {} bytes; split it into several files",
            path.display(),
            csv::FILE_BYTES_MAX
        )));
    }
    csv::parse_bytes(&bytes).map_err(|errors| CliError::Csv {
        path: path.to_path_buf(),
        errors,
    })
}

/// Checks every line of the file, then sets all its slices in one all-or-nothing call.
async fn import_allocations(
    server: &Server,
    school_id: String,
    file: &Path,
    audit: Audit,
) -> Result<BulkSetAllocationsResponse, CliError> {
    let allocations = read_allocation_file(file)?;
    let mut admin = server.admin().await?;
    let request = BulkSetAllocationsRequest {
        school_id,
        allocations,
        changed_by: audit.changed_by.unwrap_or_default(),
        reason: audit.reason.unwrap_or_default(),
    };
    Ok(admin.bulk_set_allocations(request).await?.into_inner())
}

/// What `alloc export --output FILE` says once the file is written.
struct ExportSummary {
    path: PathBuf,
    allocation_count: usize,
}

async fn export_allocations(
    mut admin: AdminClient,
    args: AllocExportArgs,
    json: bool,
) -> Result<Output, CliError> {
    let request = ListAllocationsRequest {
        school_id: args.school_id,
        teacher_id: String::new(),
        service_type: String::new(),
    };
    let mut allocations = admin
        .list_allocations(request)
        .await?
        .into_inner()
        .allocations;
    // Sorted, so that two exports of the same slices are the same file and diff cleanly.
    allocations
        .sort_by(|a, b| (&a.teacher_id, &a.service_type).cmp(&(&b.teacher_id, &b.service_type)));
    let Some(path) = args.output else {
        if json {
            return Ok(Output::text(export_json(&allocations).to_string()));
        }
        return Ok(Output::bytes(write_csv(&allocations)?));
    };
    // The file is what `alloc import` reads, whatever --json says of the summary.
    let csv = write_csv(&allocations)?;
    std::fs::write(&path, csv).map_err(|error| CliError::WriteFile {
        path: path.clone(),
        error,
    })?;
    let summary = ExportSummary {
        path,
        allocation_count: allocations.len(),
    };
    Ok(Output::text(show(summary, json)))
}

fn write_csv(allocations: &[Allocation]) -> Result<Vec<u8>, CliError> {
    csv::write(allocations).map_err(|error| CliError::Output(io::Error::other(error)))
}

/// `--json alloc export`: the slices as a JSON array, one object per line of the CSV export,
/// with the CSV's columns ([`csv::HEADER`]) as its keys.
fn export_json(allocations: &[Allocation]) -> Value {
    let slices = allocations.iter().map(|allocation| {
        json!({
            "teacher_id": allocation.teacher_id,
            "service_type": allocation.service_type,
            "allocated_units": allocation.allocated_units,
            "priority": allocation.priority,
            "auto_renew": allocation.auto_renew,
        })
    });
    Value::Array(slices.collect())
}

impl ToJson for Allocation {
    fn to_json(&self) -> Value {
        json!({
            "school_id": self.school_id,
            "teacher_id": self.teacher_id,
            "service_type": self.service_type,
            "allocated_units": self.allocated_units,
            "used_units": self.used_units,
            "reserved_units": self.reserved_units,
            "priority": self.priority,
            "auto_renew": self.auto_renew,
            "status": self.status,
        })
    }
}

impl ToJson for RemovedAllocation {
    fn to_json(&self) -> Value {
        self.0.to_json()
    }
}

impl ToJson for ListAllocationsResponse {
    fn to_json(&self) -> Value {
        json!({ "allocations": list_json(&self.allocations) })
    }
}

impl ToJson for BulkSetAllocationsResponse {
    fn to_json(&self) -> Value {
        json!({ "allocations": list_json(&self.allocations) })
    }
}

impl ToJson for ExportSummary {
    fn to_json(&self) -> Value {
        json!({
            "output": self.path.display().to_string(),
            "allocation_count": self.allocation_count,
        })
    }
}

impl Render for Allocation {
    fn render(&self) -> String {
        format!(
            "{}/{} {}: {} allocated, {} used, {} reserved; priority {}, auto-renew {}, {}",
            self.school_id,
            self.teacher_id,
            self.service_type,
            self.allocated_units,
            self.used_units,
            self.reserved_units,
            self.priority,
            on_off(self.auto_renew),
            self.status
        )
    }
}

impl Render for RemovedAllocation {
    fn render(&self) -> String {
        let removed = &self.0;
        format!(
            "removed {}/{} {}: its units are back in the pool",
            removed.school_id, removed.teacher_id, removed.service_type
        )
    }
}

/// One slice per row; the school is the one the command named.
fn allocation_table(allocations: &[Allocation]) -> String {
    let headers = [
        "TEACHER",
        "SERVICE",
        "ALLOCATED",
        "USED",
        "RESERVED",
        "PRIORITY",
        "AUTO-RENEW",
        "STATUS",
    ];
    let rows: Vec<Vec<String>> = allocations
        .iter()
        .map(|allocation| {
            vec![
                allocation.teacher_id.clone(),
                allocation.service_type.clone(),
                allocation.allocated_units.to_string(),
                allocation.used_units.to_string(),
                allocation.reserved_units.to_string(),
                allocation.priority.clone(),
                on_off(allocation.auto_renew).to_string(),
                allocation.status.clone(),
            ]
        })
        .collect();
    table(&headers, &rows)
}

impl Render for ListAllocationsResponse {
    fn render(&self) -> String {
        let count = self.allocations.len();
        format!(
            "{}\n\n{count} slice{}",
            allocation_table(&self.allocations),
            plural(count)
        )
    }
}

impl Render for BulkSetAllocationsResponse {
    fn render(&self) -> String {
        let count = self.allocations.len();
        format!(
            "{}\n\nset {count} slice{} in one call",
            allocation_table(&self.allocations),
            plural(count)
        )
    }
}

impl Render for ExportSummary {
    fn render(&self) -> String {
        format!(
            "wrote {} slice{} to {}",
            self.allocation_count,
            plural(self.allocation_count),
            self.path.display()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The JSON export holds the same fields as the CSV export, with their types.
    #[test]
    fn the_json_export_has_the_csv_columns() {
        let allocation = Allocation {
            school_id: "s1".to_string(),
            teacher_id: "t1".to_string(),
            service_type: "claude_messages".to_string(),
            allocated_units: 30,
            used_units: 7,
            reserved_units: 1,
            priority: "high".to_string(),
            auto_renew: true,
            status: "suspended".to_string(),
        };
        let exported = export_json(std::slice::from_ref(&allocation));
        let Value::Array(slices) = &exported else {
            panic!("not an array: {exported}");
        };
        let Value::Object(slice) = &slices[0] else {
            panic!("not an object: {exported}");
        };
        let mut keys: Vec<&str> = slice.keys().map(String::as_str).collect();
        let mut columns = csv::HEADER.to_vec();
        keys.sort_unstable();
        columns.sort_unstable();
        assert_eq!(keys, columns);
        assert_eq!(
            exported,
            json!([{
                "teacher_id": "t1",
                "service_type": "claude_messages",
                "allocated_units": 30,
                "priority": "high",
                "auto_renew": true,
            }])
        );
    }
}
