//! Record batches back to JSON rows (for the suite, and `ndjson`-style output).
//!
//! Handles the column types this crate produces (Utf8, Boolean, Int64,
//! Decimal128 and lists of them); other Arrow types become `null`. Decimals
//! become JSON numbers with trailing zeros dropped (`0.95`), via their exact
//! decimal text, never through f64 arithmetic.

use arrow::array::{
    Array, ArrayRef, AsArray, BooleanArray, Decimal128Array, Int32Array, Int64Array, ListArray,
    StringArray,
};
use arrow::datatypes::DataType;
use arrow::record_batch::RecordBatch;
use serde_json::{Map, Value as Json};

/// One JSON object per row, keyed by column name. Key order is serde_json's
/// (sorted, without its `preserve_order` feature), and decimals become JSON
/// numbers through serde_json's f64 (exact up to ~15 significant digits):
/// use [`write_ndjson`] for output, this for comparisons.
pub fn batch_to_json_rows(batch: &RecordBatch) -> Vec<Map<String, Json>> {
    let schema = batch.schema();
    let mut rows: Vec<Map<String, Json>> = (0..batch.num_rows()).map(|_| Map::new()).collect();
    for (field, col) in schema.fields().iter().zip(batch.columns()) {
        for (i, row) in rows.iter_mut().enumerate() {
            row.insert(field.name().clone(), cell_json(col, i));
        }
    }
    rows
}

/// Write the batch as newline-delimited JSON objects: keys in schema order,
/// decimals as their exact decimal text (a JSON number), lists as arrays.
pub fn write_ndjson(batch: &RecordBatch, out: &mut dyn std::io::Write) -> std::io::Result<()> {
    let schema = batch.schema();
    let keys: Vec<String> = schema
        .fields()
        .iter()
        .map(|f| Json::String(f.name().clone()).to_string())
        .collect();
    let mut line = String::new();
    for i in 0..batch.num_rows() {
        line.clear();
        line.push('{');
        for (k, (key, col)) in keys.iter().zip(batch.columns()).enumerate() {
            if k > 0 {
                line.push(',');
            }
            line.push_str(key);
            line.push(':');
            cell_text(col, i, &mut line);
        }
        line.push_str("}\n");
        out.write_all(line.as_bytes())?;
    }
    Ok(())
}

/// JSON text of row `i` of an array, decimals exact.
fn cell_text(col: &ArrayRef, i: usize, out: &mut String) {
    if col.is_null(i) {
        out.push_str("null");
        return;
    }
    match col.data_type() {
        DataType::Decimal128(_, scale) => match col.as_any().downcast_ref::<Decimal128Array>() {
            Some(a) => out.push_str(&decimal_text(a.value(i), *scale)),
            None => out.push_str("null"),
        },
        DataType::List(_) => match col.as_any().downcast_ref::<ListArray>() {
            Some(list) => {
                let values = list.value(i);
                out.push('[');
                for j in 0..values.len() {
                    if j > 0 {
                        out.push(',');
                    }
                    cell_text(&values, j, out);
                }
                out.push(']');
            }
            None => out.push_str("null"),
        },
        _ => out.push_str(&cell_json(col, i).to_string()),
    }
}

/// Text of an unscaled decimal at `scale`, without trailing fraction zeros.
pub fn decimal_text(unscaled: i128, scale: i8) -> String {
    if scale <= 0 {
        let mut s = unscaled.to_string();
        if unscaled != 0 {
            s.extend(std::iter::repeat_n('0', scale.unsigned_abs() as usize));
        }
        return s;
    }
    let neg = unscaled < 0;
    let digits = unscaled.unsigned_abs().to_string();
    let scale = scale as usize;
    let padded = if digits.len() <= scale {
        format!("{}{digits}", "0".repeat(scale - digits.len() + 1))
    } else {
        digits
    };
    let (int, frac) = padded.split_at(padded.len() - scale);
    let frac = frac.trim_end_matches('0');
    let sign = if neg { "-" } else { "" };
    if frac.is_empty() {
        format!("{sign}{int}")
    } else {
        format!("{sign}{int}.{frac}")
    }
}

/// The JSON value of row `i` of an array.
pub fn cell_json(col: &ArrayRef, i: usize) -> Json {
    if col.is_null(i) {
        return Json::Null;
    }
    match col.data_type() {
        DataType::Utf8 => col
            .as_any()
            .downcast_ref::<StringArray>()
            .map_or(Json::Null, |a| Json::String(a.value(i).to_string())),
        DataType::Boolean => col
            .as_any()
            .downcast_ref::<BooleanArray>()
            .map_or(Json::Null, |a| Json::Bool(a.value(i))),
        DataType::Int64 => col
            .as_any()
            .downcast_ref::<Int64Array>()
            .map_or(Json::Null, |a| Json::from(a.value(i))),
        DataType::Int32 => col
            .as_any()
            .downcast_ref::<Int32Array>()
            .map_or(Json::Null, |a| Json::from(a.value(i))),
        DataType::Decimal128(_, scale) => {
            col.as_any()
                .downcast_ref::<Decimal128Array>()
                .map_or(Json::Null, |a| {
                    let text = decimal_text(a.value(i), *scale);
                    serde_json::from_str::<serde_json::Number>(&text)
                        .map(Json::Number)
                        .unwrap_or(Json::String(text))
                })
        }
        DataType::List(_) => match col.as_any().downcast_ref::<ListArray>() {
            Some(list) => {
                let values = list.value(i);
                Json::Array((0..values.len()).map(|j| cell_json(&values, j)).collect())
            }
            None => Json::Null,
        },
        DataType::LargeUtf8 => Json::String(col.as_string::<i64>().value(i).to_string()),
        _ => Json::Null,
    }
}
