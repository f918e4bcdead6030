//! Subset filters (`--filter`, and FastGPT's `--team`/`--dataset`/
//! `--collection`): a small portable grammar — `column = 'value'`,
//! `column IN ('a', 'b')`, terms joined by `AND` — translated per backend.
//! Values are never spliced into SQL: SQL gets placeholders and the values
//! to bind; Milvus gets a boolean expression with escaped string literals.

use anyhow::{Result, anyhow, bail};
use serde::{Deserialize, Serialize};

/// A value of a term: a string or an integer literal.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Value {
    Int(i64),
    Str(String),
}

/// `column IN (values)` (`column = value` is the one-value case).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Term {
    pub column: String,
    pub values: Vec<Value>,
}

/// Terms joined by AND.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Filter {
    pub terms: Vec<Term>,
}

#[derive(Debug, PartialEq)]
enum Token {
    Word(String),
    Str(String),
    Int(i64),
    Eq,
    Comma,
    Open,
    Close,
}

fn tokens(s: &str) -> Result<Vec<Token>> {
    let mut out = Vec::new();
    let mut it = s.char_indices().peekable();
    while let Some(&(at, c)) = it.peek() {
        match c {
            c if c.is_whitespace() => {
                it.next();
            }
            '=' => {
                it.next();
                out.push(Token::Eq);
            }
            ',' => {
                it.next();
                out.push(Token::Comma);
            }
            '(' => {
                it.next();
                out.push(Token::Open);
            }
            ')' => {
                it.next();
                out.push(Token::Close);
            }
            '\'' => {
                it.next();
                let mut v = String::new();
                loop {
                    match it.next() {
                        // '' inside a literal is one quote, as in SQL.
                        Some((_, '\'')) if it.peek().is_some_and(|(_, c)| *c == '\'') => {
                            it.next();
                            v.push('\'');
                        }
                        Some((_, '\'')) => break,
                        Some((_, c)) => v.push(c),
                        None => bail!("filter: the string starting at character {} is not closed", at + 1),
                    }
                }
                out.push(Token::Str(v));
            }
            c if c == '-' || c.is_ascii_digit() => {
                let mut v = String::new();
                while let Some(&(_, c)) = it.peek().filter(|(_, c)| *c == '-' || c.is_ascii_digit()) {
                    v.push(c);
                    it.next();
                }
                out.push(Token::Int(v.parse().map_err(|_| anyhow!("filter: {v} is not an integer"))?));
            }
            c if c.is_alphanumeric() || c == '_' => {
                let mut v = String::new();
                while let Some(&(_, c)) = it.peek().filter(|(_, c)| c.is_alphanumeric() || *c == '_') {
                    v.push(c);
                    it.next();
                }
                out.push(Token::Word(v));
            }
            other => bail!("filter: unexpected {other:?} at character {}; the grammar is column = 'value', column IN ('a', 'b'), joined by AND", at + 1),
        }
    }
    Ok(out)
}

fn value(t: Option<Token>) -> Result<Value> {
    match t {
        Some(Token::Str(s)) => Ok(Value::Str(s)),
        Some(Token::Int(i)) => Ok(Value::Int(i)),
        other => bail!("filter: expected a value ('text' or an integer), found {other:?}"),
    }
}

impl Filter {
    pub fn parse(text: &str) -> Result<Filter> {
        let mut ts = tokens(text)?.into_iter().peekable();
        let mut terms = Vec::new();
        loop {
            let column = match ts.next() {
                Some(Token::Word(w)) => w,
                other => bail!("filter: expected a column name, found {other:?}"),
            };
            let values = match ts.next() {
                Some(Token::Eq) => vec![value(ts.next())?],
                Some(Token::Word(w)) if w.eq_ignore_ascii_case("in") => {
                    if ts.next() != Some(Token::Open) {
                        bail!("filter: IN needs a parenthesised list of values");
                    }
                    let mut vs = vec![value(ts.next())?];
                    loop {
                        match ts.next() {
                            Some(Token::Comma) => vs.push(value(ts.next())?),
                            Some(Token::Close) => break,
                            other => bail!("filter: expected , or ) in the IN list, found {other:?}"),
                        }
                    }
                    vs
                }
                other => bail!("filter: expected = or IN after {column}, found {other:?}"),
            };
            terms.push(Term { column, values });
            match ts.next() {
                None => break,
                Some(Token::Word(w)) if w.eq_ignore_ascii_case("and") => continue,
                Some(other) => bail!("filter: terms are joined by AND only, found {other:?}"),
            }
        }
        Ok(Filter { terms })
    }

    /// FastGPT's shortcuts (`--team`, `--dataset`, `--collection`), ANDed
    /// with an explicit filter if there is one.
    pub fn with_fastgpt(filter: Option<Filter>, team: Option<&str>, dataset: Option<&str>, collection: Option<&str>) -> Option<Filter> {
        let mut terms = filter.map(|f| f.terms).unwrap_or_default();
        for (column, v) in [("team_id", team), ("dataset_id", dataset), ("collection_id", collection)] {
            if let Some(v) = v {
                terms.push(Term { column: column.into(), values: vec![Value::Str(v.into())] });
            }
        }
        (!terms.is_empty()).then_some(Filter { terms })
    }

    /// The columns the filter names (to check against a table's spec).
    pub fn columns(&self) -> impl Iterator<Item = &str> {
        self.terms.iter().map(|t| t.column.as_str())
    }

    /// A SQL condition with placeholders made by `placeholder(n)` (n counts
    /// from `first`), and the values to bind in that order. `quote` quotes
    /// an identifier for the backend.
    pub fn sql(&self, first: usize, placeholder: &dyn Fn(usize) -> String, quote: &dyn Fn(&str) -> String) -> (String, Vec<Value>) {
        let mut n = first;
        let mut binds = Vec::new();
        let parts: Vec<String> = self
            .terms
            .iter()
            .map(|t| {
                let ps: Vec<String> = t
                    .values
                    .iter()
                    .map(|v| {
                        binds.push(v.clone());
                        let p = placeholder(n);
                        n += 1;
                        p
                    })
                    .collect();
                if ps.len() == 1 { format!("{} = {}", quote(&t.column), ps[0]) } else { format!("{} IN ({})", quote(&t.column), ps.join(", ")) }
            })
            .collect();
        (parts.join(" AND "), binds)
    }

    /// A SQL condition for statements that take no bind parameters (COPY):
    /// every value, integers too, becomes a string literal made by the
    /// backend's own escaping `literal` (SQL compares '5' with an integer
    /// column as 5). `ident` quotes a name; columns are qualified by
    /// `qualifier` when given.
    pub fn sql_literals(&self, qualifier: Option<&str>, ident: &dyn Fn(&str) -> String, literal: &dyn Fn(&str) -> String) -> String {
        let quote = |c: &str| match qualifier {
            Some(q) => format!("{q}.{}", ident(c)),
            None => ident(c),
        };
        self.terms
            .iter()
            .map(|t| {
                let vs: Vec<String> = t
                    .values
                    .iter()
                    .map(|v| match v {
                        Value::Int(i) => literal(&i.to_string()),
                        Value::Str(s) => literal(s),
                    })
                    .collect();
                if vs.len() == 1 { format!("{} = {}", quote(&t.column), vs[0]) } else { format!("{} IN ({})", quote(&t.column), vs.join(", ")) }
            })
            .collect::<Vec<_>>()
            .join(" AND ")
    }

    /// Refuses a filter naming a column the table does not have.
    pub fn check_columns(&self, spec: &crate::model::schema::TableSpec, side: &str) -> Result<()> {
        for c in self.columns() {
            let Some(col) = spec.column(c) else {
                bail!(
                    "filter: {side} has no column {c} (its columns: {})",
                    spec.columns.iter().map(|c| c.name.as_str()).collect::<Vec<_>>().join(", ")
                );
            };
            if col.ty.is_vector() {
                bail!("filter: {c} is a vector column; filters compare text and integer columns");
            }
        }
        Ok(())
    }

    /// A Milvus boolean expression, columns mapped to field names by `field`.
    pub fn milvus_expr(&self, field: &dyn Fn(&str) -> Option<String>) -> Result<String> {
        let lit = |v: &Value| match v {
            Value::Int(i) => i.to_string(),
            Value::Str(s) => format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\"")),
        };
        let parts = self
            .terms
            .iter()
            .map(|t| {
                let f = field(&t.column).ok_or_else(|| anyhow!("filter: the collection has no field for column {}", t.column))?;
                Ok(if t.values.len() == 1 {
                    format!("{f} == {}", lit(&t.values[0]))
                } else {
                    format!("{f} in [{}]", t.values.iter().map(lit).collect::<Vec<_>>().join(", "))
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(parts.join(" and "))
    }

    /// The filter in its canonical text (manifests, ledgers, messages).
    pub fn describe(&self) -> String {
        let lit = |v: &Value| match v {
            Value::Int(i) => i.to_string(),
            Value::Str(s) => format!("'{}'", s.replace('\'', "''")),
        };
        self.terms
            .iter()
            .map(|t| {
                if t.values.len() == 1 {
                    format!("{} = {}", t.column, lit(&t.values[0]))
                } else {
                    format!("{} IN ({})", t.column, t.values.iter().map(lit).collect::<Vec<_>>().join(", "))
                }
            })
            .collect::<Vec<_>>()
            .join(" AND ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_grammar_and_round_trips_its_text() {
        let f = Filter::parse("team_id = 'a''b' and dataset_id IN ('d1','d2') AND n = -3").unwrap();
        assert_eq!(f.terms.len(), 3);
        assert_eq!(f.terms[0].values, vec![Value::Str("a'b".into())]);
        assert_eq!(f.terms[2].values, vec![Value::Int(-3)]);
        assert_eq!(f.describe(), "team_id = 'a''b' AND dataset_id IN ('d1', 'd2') AND n = -3");
        assert_eq!(Filter::parse(&f.describe()).unwrap(), f);
    }

    #[test]
    fn refuses_anything_else_with_a_reason() {
        for bad in ["team_id = 'x' OR 1 = 1", "team_id = 'x'; DROP TABLE t", "team_id > 3", "team_id = 'open", "IN ('a')", "team_id IN 'a'"] {
            assert!(Filter::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn sql_binds_values_and_milvus_escapes_them() {
        let f = Filter::parse("team_id = 'x\" or 1==1' AND dataset_id IN ('a', 'b')").unwrap();
        let (sql, binds) = f.sql(3, &|n| format!("${n}"), &|c| format!("\"{c}\""));
        assert_eq!(sql, "\"team_id\" = $3 AND \"dataset_id\" IN ($4, $5)");
        assert_eq!(binds.len(), 3);
        let map = |c: &str| Some(if c == "team_id" { "teamId".to_string() } else { "datasetId".to_string() });
        assert_eq!(f.milvus_expr(&map).unwrap(), "teamId == \"x\\\" or 1==1\" and datasetId in [\"a\", \"b\"]");
    }

    #[test]
    fn fastgpt_shortcuts_join_an_explicit_filter() {
        let f = Filter::with_fastgpt(Some(Filter::parse("collection_id = 'c'").unwrap()), Some("t1"), None, None).unwrap();
        assert_eq!(f.describe(), "collection_id = 'c' AND team_id = 't1'");
        assert!(Filter::with_fastgpt(None, None, None, None).is_none());
    }
}
