//! Column types: FHIR type names to Arrow types.
//!
//! | FHIR column `type`                                   | Arrow                  |
//! |------------------------------------------------------|------------------------|
//! | string, code, id, uri, url, canonical, oid, uuid, markdown, base64Binary, xhtml | `Utf8` |
//! | date, dateTime, instant, time                        | `Utf8` (FHIR text, as written; see below) |
//! | boolean                                              | `Boolean`              |
//! | integer, positiveInt, unsignedInt, integer64         | `Int64`                |
//! | decimal                                              | `Decimal128(38, 18)`   |
//! | `collection: true`                                   | `List<item type>`      |
//!
//! * Integers are `Int64` for every integer type: FHIRPath integers are 64-bit,
//!   and one width for all keeps `unionAll` branches and computed values simple.
//! * Decimals are `Decimal128(38, 18)`: 20 integer and 18 fraction digits. A
//!   value that does not fit exactly (more than 18 significant fraction digits,
//!   or 20+ integer digits) is a run-time error for that resource, never a
//!   rounding; there is no f64 anywhere in the view code. Resource values
//!   are read from the number's exact JSON text when the resource comes in as
//!   text or an `atlas_fhirpath::json` tree
//!   ([`crate::CompiledView::append_json_text`], `append_tree`); a
//!   `serde_json::Value` ([`crate::CompiledView::append`]) has already been
//!   through serde_json's `f64`. FHIR decimal *precision* (trailing zeros,
//!   `1.50` vs `1.5`) is not kept in the column.
//! * Dates and times stay text: partial dates (`1974`, `1974-12`) and
//!   time zones do not map to Arrow temporal types without loss. Values read
//!   from the resource are emitted exactly as written; computed ones
//!   (`lowBoundary()`, `now()`) in FHIR format.
//! * Untyped columns take the type the FHIRPath checker infers when all
//!   possible result types agree (Boolean, Integer, Decimal); otherwise `Utf8`,
//!   where complex values are written as their JSON text.

use arrow::datatypes::DataType;

/// Decimal128 precision of decimal columns.
pub const DECIMAL_PRECISION: u8 = 38;
/// Decimal128 scale of decimal columns.
pub const DECIMAL_SCALE: i8 = 18;

/// The physical kind of a column's items.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ColumnKind {
    Utf8,
    Boolean,
    Int64,
    Decimal,
}

impl ColumnKind {
    /// The kind of a declared FHIR type; `None` for types that cannot be a column.
    pub fn from_fhir_type(ty: &str) -> Option<ColumnKind> {
        Some(match ty {
            "string" | "code" | "id" | "uri" | "url" | "canonical" | "oid" | "uuid"
            | "markdown" | "base64Binary" | "xhtml" | "date" | "dateTime" | "instant" | "time" => {
                ColumnKind::Utf8
            }
            "boolean" => ColumnKind::Boolean,
            "integer" | "positiveInt" | "unsignedInt" | "integer64" => ColumnKind::Int64,
            "decimal" => ColumnKind::Decimal,
            _ => return None,
        })
    }

    /// The kind for a System type name (`Boolean`, `Integer`, ...).
    pub fn from_system_type(ty: &str) -> ColumnKind {
        match ty {
            "Boolean" => ColumnKind::Boolean,
            "Integer" => ColumnKind::Int64,
            "Decimal" => ColumnKind::Decimal,
            _ => ColumnKind::Utf8,
        }
    }

    /// The Arrow type of one item.
    pub fn item_type(self) -> DataType {
        match self {
            ColumnKind::Utf8 => DataType::Utf8,
            ColumnKind::Boolean => DataType::Boolean,
            ColumnKind::Int64 => DataType::Int64,
            ColumnKind::Decimal => DataType::Decimal128(DECIMAL_PRECISION, DECIMAL_SCALE),
        }
    }

    /// The Arrow type of the column (a list for collection columns).
    pub fn data_type(self, collection: bool) -> DataType {
        if collection {
            DataType::List(std::sync::Arc::new(
                arrow::datatypes::Field::new_list_field(self.item_type(), true),
            ))
        } else {
            self.item_type()
        }
    }
}
