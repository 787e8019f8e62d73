//! Reading text cells out of Arrow columns, whatever string layout the
//! table stored (partition columns come dictionary-encoded).

use arrow::array::{Array, ArrayRef, AsArray};
use arrow::datatypes::DataType;

use crate::AccessError;

/// A text column as plain Utf8 (or the string layout it already has).
pub fn utf8(a: &ArrayRef) -> Result<ArrayRef, AccessError> {
    match a.data_type() {
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => Ok(a.clone()),
        _ => arrow::compute::cast(a, &DataType::Utf8).map_err(AccessError::internal),
    }
}

/// The text at `row`, `None` for a null or a non-string column.
pub fn text(a: &dyn Array, row: usize) -> Option<&str> {
    if a.is_null(row) {
        return None;
    }
    match a.data_type() {
        DataType::Utf8 => Some(a.as_string::<i32>().value(row)),
        DataType::LargeUtf8 => Some(a.as_string::<i64>().value(row)),
        DataType::Utf8View => Some(a.as_string_view().value(row)),
        _ => None,
    }
}
