//! The SQL functions every tally SQLite connection has: sketch measures
//! (`aggregate::sketch`) merge inside SQLite's own statements.
//!
//! - `tally_sketch_merge(a, b)`: the merge of two sketches of one kind
//!   (NULL is the identity), used by upserts and delta folds.
//! - `tally_sketch_union(x)`: the aggregate union, used by reads and the
//!   `__merged` views. A plain `sqlite3` shell lacks both: such a view
//!   reads there only for rollups without sketches.

use rusqlite::functions::{Aggregate, Context, FunctionFlags};
use rusqlite::Connection;

use crate::aggregate::sketch::{self, SketchError};

fn user(e: SketchError) -> rusqlite::Error {
    rusqlite::Error::UserFunctionError(Box::new(e))
}

fn kind_of(b: &[u8]) -> rusqlite::Result<sketch::SketchKind> {
    sketch::kind_of(b).ok_or_else(|| {
        rusqlite::Error::UserFunctionError(
            "a sketch cell holds bytes that are not an HLL or KLL sketch".into(),
        )
    })
}

/// Register the functions on `c`.
pub(in crate::sink::serving) fn register(c: &Connection) -> rusqlite::Result<()> {
    let flags = FunctionFlags::SQLITE_UTF8 | FunctionFlags::SQLITE_DETERMINISTIC;
    c.create_scalar_function("tally_sketch_merge", 2, flags, |ctx| {
        let a: Option<Vec<u8>> = ctx.get(0)?;
        let b: Option<Vec<u8>> = ctx.get(1)?;
        match (a, b) {
            (None, x) | (x, None) => Ok(x),
            (Some(a), Some(b)) => sketch::merge(kind_of(&a)?, &a, &b).map(Some).map_err(user),
        }
    })?;
    c.create_aggregate_function("tally_sketch_union", 1, flags, Union)
}

struct Union;

impl Aggregate<Vec<Vec<u8>>, Option<Vec<u8>>> for Union {
    fn init(&self, _: &mut Context<'_>) -> rusqlite::Result<Vec<Vec<u8>>> {
        Ok(Vec::new())
    }

    fn step(&self, ctx: &mut Context<'_>, acc: &mut Vec<Vec<u8>>) -> rusqlite::Result<()> {
        if let Some(b) = ctx.get::<Option<Vec<u8>>>(0)? {
            acc.push(b);
        }
        Ok(())
    }

    fn finalize(
        &self,
        _: &mut Context<'_>,
        acc: Option<Vec<Vec<u8>>>,
    ) -> rusqlite::Result<Option<Vec<u8>>> {
        let Some(parts) = acc.filter(|p| !p.is_empty()) else {
            return Ok(None);
        };
        if parts.len() == 1 {
            return Ok(parts.into_iter().next());
        }
        let kind = kind_of(&parts[0])?;
        sketch::union(kind, parts.iter().map(Vec::as_slice)).map_err(user)
    }
}
