//! Vector values as every backend and the comparisons see them.

use arrow::array::{ArrayRef, AsArray};
use arrow::datatypes::{DataType, Float32Type};

/// The float32 values of one vector cell (FixedSizeList or List).
pub fn vector_values(col: &ArrayRef, row: usize) -> &[f32] {
    match col.data_type() {
        DataType::FixedSizeList(_, n) => {
            let l = col.as_fixed_size_list();
            let n = *n as usize;
            let all = l.values().as_primitive::<Float32Type>().values();
            let start = l.value_offset_at(row) as usize;
            &all[start..start + n]
        }
        _ => {
            let l = col.as_list::<i32>();
            let offs = l.value_offsets();
            let all = l.values().as_primitive::<Float32Type>().values();
            &all[offs[row] as usize..offs[row + 1] as usize]
        }
    }
}

/// The value OceanBase's VECTOR text shows for `x`: rounded to 6
/// significant digits, then read back as float32. Idempotent; verify
/// compares both sides in this form when one side's vectors were read that
/// way (a staging area written from OceanBase by an earlier vmig).
pub fn round_like_oceanbase(x: f32) -> f32 {
    if x == 0.0 || !x.is_finite() {
        return x;
    }
    format!("{:.5e}", x).parse().unwrap_or(x)
}
