//! Recursive-descent parser.
//!
//! Precedence, lowest first: `OR`, `AND`, `NOT`, comparisons and `IN`/`NIN`, `+ -`, `* / %`, unary
//! `-`, primaries.

use serde_json::Value;

use crate::QueryError;
use crate::ast::{
    Aggregate, BinaryOp, Expr, Path, Projection, ProjectionItem, ProjectionValue, Query, Segment,
    Source,
};
use crate::lexer::{Kind, Token, tokenize};

struct Parser {
    tokens: Vec<Token>,
    pos: usize,
}

const KEYWORDS: [&str; 16] = [
    "SELECT",
    "FROM",
    "WHERE",
    "GROUP",
    "BY",
    "TOP",
    "AS",
    "AND",
    "OR",
    "NOT",
    "IN",
    "NIN",
    "TRUE",
    "FALSE",
    "NULL",
    "UNDEFINED",
];

/// Parses a whole query (`SELECT ... FROM ...`).
pub fn parse_query(text: &str) -> Result<Query, QueryError> {
    let mut p = Parser {
        tokens: tokenize(text)?,
        pos: 0,
    };
    let q = p.query()?;
    p.expect_end()?;
    Ok(q)
}

/// Parses a condition (a routing query, or a `WHERE` clause on its own).
pub fn parse_condition(text: &str) -> Result<Expr, QueryError> {
    let mut p = Parser {
        tokens: tokenize(text)?,
        pos: 0,
    };
    let e = p.expr()?;
    p.expect_end()?;
    Ok(e)
}

impl Parser {
    fn peek(&self) -> &Token {
        // tokenize always ends with End, and pos never passes it.
        &self.tokens[self.pos.min(self.tokens.len() - 1)]
    }

    fn next(&mut self) -> Token {
        let t = self.peek().clone();
        if self.pos < self.tokens.len() - 1 {
            self.pos += 1;
        }
        t
    }

    fn error<T>(&self, message: impl Into<String>) -> Result<T, QueryError> {
        let t = self.peek();
        Err(QueryError::at(message, t.line, t.column))
    }

    fn is_keyword(&self, kw: &str) -> bool {
        matches!(&self.peek().kind, Kind::Ident(name, false) if name.eq_ignore_ascii_case(kw))
    }

    fn eat_keyword(&mut self, kw: &str) -> bool {
        if self.is_keyword(kw) {
            self.next();
            true
        } else {
            false
        }
    }

    fn expect_keyword(&mut self, kw: &str) -> Result<(), QueryError> {
        if self.eat_keyword(kw) {
            Ok(())
        } else {
            self.error(format!("expected {kw}"))
        }
    }

    fn is_sym(&self, sym: &str) -> bool {
        matches!(&self.peek().kind, Kind::Sym(s) if *s == sym)
    }

    fn eat_sym(&mut self, sym: &str) -> bool {
        if self.is_sym(sym) {
            self.next();
            true
        } else {
            false
        }
    }

    fn expect_sym(&mut self, sym: &str) -> Result<(), QueryError> {
        if self.eat_sym(sym) {
            Ok(())
        } else {
            self.error(format!("expected '{sym}'"))
        }
    }

    fn expect_end(&mut self) -> Result<(), QueryError> {
        if matches!(self.peek().kind, Kind::End) {
            Ok(())
        } else {
            self.error("unexpected text after the end of the query")
        }
    }

    fn name(&mut self) -> Result<String, QueryError> {
        match self.peek().kind.clone() {
            Kind::Ident(name, quoted) => {
                if !quoted && KEYWORDS.iter().any(|k| k.eq_ignore_ascii_case(&name)) {
                    return self
                        .error(format!("{name} is a reserved word; quote it as [[{name}]]"));
                }
                self.next();
                Ok(name)
            }
            _ => self.error("expected a property name"),
        }
    }

    fn query(&mut self) -> Result<Query, QueryError> {
        self.expect_keyword("SELECT")?;
        let top = if self.eat_keyword("TOP") {
            match self.next().kind {
                Kind::Number(n) if n >= 0.0 && n.fract() == 0.0 => Some(n as u64),
                _ => return self.error("TOP needs a whole number"),
            }
        } else {
            None
        };
        let projection = if self.eat_sym("*") {
            Projection::Star
        } else {
            let mut items = vec![self.projection_item()?];
            while self.eat_sym(",") {
                items.push(self.projection_item()?);
            }
            Projection::Items(items)
        };
        self.expect_keyword("FROM")?;
        let from = self.source()?;
        let condition = if self.eat_keyword("WHERE") {
            Some(self.expr()?)
        } else {
            None
        };
        let mut group_by = Vec::new();
        if self.eat_keyword("GROUP") {
            self.expect_keyword("BY")?;
            group_by.push(self.path()?);
            while self.eat_sym(",") {
                group_by.push(self.path()?);
            }
        }
        Ok(Query {
            top,
            projection,
            from,
            condition,
            group_by,
        })
    }

    fn source(&mut self) -> Result<Source, QueryError> {
        let first = self.name()?;
        if !first.eq_ignore_ascii_case("devices") {
            return self.error("FROM must be devices, devices.modules or devices.jobs");
        }
        if !self.eat_sym(".") {
            return Ok(Source::Devices);
        }
        let second = self.name()?;
        if second.eq_ignore_ascii_case("modules") {
            Ok(Source::DevicesModules)
        } else if second.eq_ignore_ascii_case("jobs") {
            Ok(Source::DevicesJobs)
        } else {
            self.error("FROM must be devices, devices.modules or devices.jobs")
        }
    }

    fn projection_item(&mut self) -> Result<ProjectionItem, QueryError> {
        let value = match self.peek().kind.clone() {
            Kind::Ident(name, false)
                if matches!(
                    self.tokens.get(self.pos + 1).map(|t| &t.kind),
                    Some(Kind::Sym("("))
                ) =>
            {
                let aggregate = match name.to_ascii_uppercase().as_str() {
                    "COUNT" => Aggregate::Count,
                    "AVG" => Aggregate::Avg,
                    "SUM" => Aggregate::Sum,
                    "MIN" => Aggregate::Min,
                    "MAX" => Aggregate::Max,
                    _ => {
                        return self.error(format!(
                            "{name} is not an aggregate (COUNT, AVG, SUM, MIN, MAX)"
                        ));
                    }
                };
                self.next();
                self.expect_sym("(")?;
                let arg = if self.is_sym(")") {
                    None
                } else {
                    Some(self.path()?)
                };
                self.expect_sym(")")?;
                if aggregate != Aggregate::Count && arg.is_none() {
                    return self.error(format!("{name} needs a property"));
                }
                ProjectionValue::Aggregate(aggregate, arg)
            }
            _ => ProjectionValue::Path(self.path()?),
        };
        let alias = if self.eat_keyword("AS") {
            Some(self.name()?)
        } else {
            None
        };
        Ok(ProjectionItem { value, alias })
    }

    fn path(&mut self) -> Result<Path, QueryError> {
        let mut segments = vec![Segment::Field(self.name()?)];
        loop {
            if self.eat_sym(".") {
                segments.push(Segment::Field(self.name()?));
            } else if matches!(self.peek().kind, Kind::Ident(_, true)) {
                // `a[[b]]` written without a dot
                segments.push(Segment::Field(self.name()?));
            } else if self.is_sym("[") {
                self.next();
                match self.next().kind {
                    Kind::Number(n) if n >= 0.0 && n.fract() == 0.0 => {
                        segments.push(Segment::Index(n as usize))
                    }
                    _ => return self.error("an array index must be a whole number"),
                }
                self.expect_sym("]")?;
            } else {
                return Ok(Path { segments });
            }
        }
    }

    fn expr(&mut self) -> Result<Expr, QueryError> {
        let mut left = self.and()?;
        while self.eat_keyword("OR") {
            left = Expr::Binary(BinaryOp::Or, Box::new(left), Box::new(self.and()?));
        }
        Ok(left)
    }

    fn and(&mut self) -> Result<Expr, QueryError> {
        let mut left = self.not()?;
        while self.eat_keyword("AND") {
            left = Expr::Binary(BinaryOp::And, Box::new(left), Box::new(self.not()?));
        }
        Ok(left)
    }

    fn not(&mut self) -> Result<Expr, QueryError> {
        if self.eat_keyword("NOT") {
            return Ok(Expr::Not(Box::new(self.not()?)));
        }
        self.comparison()
    }

    fn comparison(&mut self) -> Result<Expr, QueryError> {
        let left = self.additive()?;
        let op = match &self.peek().kind {
            Kind::Sym("=") => Some(BinaryOp::Eq),
            Kind::Sym("!=") | Kind::Sym("<>") => Some(BinaryOp::Ne),
            Kind::Sym("<") => Some(BinaryOp::Lt),
            Kind::Sym("<=") => Some(BinaryOp::Le),
            Kind::Sym(">") => Some(BinaryOp::Gt),
            Kind::Sym(">=") => Some(BinaryOp::Ge),
            _ => None,
        };
        if let Some(op) = op {
            self.next();
            let right = self.additive()?;
            return Ok(Expr::Binary(op, Box::new(left), Box::new(right)));
        }
        let negated = if self.eat_keyword("IN") {
            false
        } else if self.eat_keyword("NIN") {
            true
        } else {
            return Ok(left);
        };
        self.expect_sym("[")?;
        let mut list = Vec::new();
        if !self.is_sym("]") {
            list.push(self.expr()?);
            while self.eat_sym(",") {
                list.push(self.expr()?);
            }
        }
        self.expect_sym("]")?;
        Ok(Expr::In {
            value: Box::new(left),
            list,
            negated,
        })
    }

    fn additive(&mut self) -> Result<Expr, QueryError> {
        let mut left = self.multiplicative()?;
        loop {
            let op = if self.eat_sym("+") {
                BinaryOp::Add
            } else if self.eat_sym("-") {
                BinaryOp::Sub
            } else {
                return Ok(left);
            };
            left = Expr::Binary(op, Box::new(left), Box::new(self.multiplicative()?));
        }
    }

    fn multiplicative(&mut self) -> Result<Expr, QueryError> {
        let mut left = self.unary()?;
        loop {
            let op = if self.eat_sym("*") {
                BinaryOp::Mul
            } else if self.eat_sym("/") {
                BinaryOp::Div
            } else if self.eat_sym("%") {
                BinaryOp::Rem
            } else {
                return Ok(left);
            };
            left = Expr::Binary(op, Box::new(left), Box::new(self.unary()?));
        }
    }

    fn unary(&mut self) -> Result<Expr, QueryError> {
        if self.eat_sym("-") {
            return Ok(Expr::Negate(Box::new(self.unary()?)));
        }
        self.primary()
    }

    fn primary(&mut self) -> Result<Expr, QueryError> {
        match self.peek().kind.clone() {
            Kind::Number(n) => {
                self.next();
                Ok(Expr::Constant(Some(number(n))))
            }
            Kind::Str(s) => {
                self.next();
                Ok(Expr::Constant(Some(Value::String(s))))
            }
            Kind::Sym("(") => {
                self.next();
                let e = self.expr()?;
                self.expect_sym(")")?;
                Ok(e)
            }
            Kind::Sym("[") => {
                self.next();
                let mut items = Vec::new();
                if !self.is_sym("]") {
                    items.push(self.expr()?);
                    while self.eat_sym(",") {
                        items.push(self.expr()?);
                    }
                }
                self.expect_sym("]")?;
                Ok(Expr::Array(items))
            }
            Kind::Ident(name, false) => {
                let upper = name.to_ascii_uppercase();
                match upper.as_str() {
                    "TRUE" => {
                        self.next();
                        return Ok(Expr::Constant(Some(Value::Bool(true))));
                    }
                    "FALSE" => {
                        self.next();
                        return Ok(Expr::Constant(Some(Value::Bool(false))));
                    }
                    "NULL" => {
                        self.next();
                        return Ok(Expr::Constant(Some(Value::Null)));
                    }
                    "UNDEFINED" => {
                        self.next();
                        return Ok(Expr::Constant(None));
                    }
                    _ => {}
                }
                if matches!(
                    self.tokens.get(self.pos + 1).map(|t| &t.kind),
                    Some(Kind::Sym("("))
                ) {
                    self.next();
                    self.next();
                    let mut args = Vec::new();
                    if !self.is_sym(")") {
                        args.push(self.expr()?);
                        while self.eat_sym(",") {
                            args.push(self.expr()?);
                        }
                    }
                    self.expect_sym(")")?;
                    if !crate::eval::is_function(&upper) {
                        let t = &self.tokens[self.pos.saturating_sub(1)];
                        return Err(QueryError::at(
                            format!("unknown function {name}"),
                            t.line,
                            t.column,
                        ));
                    }
                    return Ok(Expr::Call(upper, args));
                }
                Ok(Expr::Path(self.path()?))
            }
            Kind::Ident(_, true) => Ok(Expr::Path(self.path()?)),
            Kind::End => self.error("the query ends too early"),
            _ => self.error("expected a value, a property or a function"),
        }
    }
}

/// A JSON number: an integer when the value is whole and in range.
fn number(n: f64) -> Value {
    if n.fract() == 0.0 && n.abs() < 9.0e15 {
        Value::from(n as i64)
    } else {
        serde_json::Number::from_f64(n).map_or(Value::Null, Value::Number)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_documentation_examples() {
        for q in [
            "SELECT * FROM devices",
            "SELECT * FROM devices WHERE tags.location.region = 'US'",
            "SELECT * FROM devices WHERE tags.location.region = 'US' AND properties.reported.telemetryConfig.sendFrequencyInSecs >= 60",
            "SELECT * FROM devices WHERE properties.reported.connectivity IN ['wired', 'wifi']",
            "SELECT * FROM devices WHERE is_defined(properties.reported.connectivity)",
            "SELECT properties.reported.telemetryConfig.status AS status, COUNT() AS numberOfDevices FROM devices GROUP BY properties.reported.telemetryConfig.status",
            "SELECT * FROM devices.modules WHERE properties.reported.status = 'scanning'",
            "SELECT * FROM devices.jobs WHERE devices.jobs.deviceId = 'myDeviceId'",
            "SELECT TOP 10 deviceId, lastActivityTime FROM devices",
            "SELECT * FROM devices WHERE tags.[[group]].name = 'x'",
        ] {
            parse_query(q).unwrap_or_else(|e| panic!("{q}: {e}"));
        }
        for c in [
            "$body.Weather.Temperature > 50",
            "$connectionDeviceId = 'd1' OR processingPath = \"hot\"",
            "length($body.Weather.Location.State) = 2",
            "$body.Weather.IsEnabled",
            "$twin.tags.deploymentLocation.floor = 1 AND NOT (a NIN [1, 2])",
            "$body.readings[0].value * 2 - 1 >= -3 % 2",
        ] {
            parse_condition(c).unwrap_or_else(|e| panic!("{c}: {e}"));
        }
    }

    #[test]
    fn errors_point_at_the_problem() {
        let e = parse_query("SELECT * FROM things").expect_err("bad source");
        assert_eq!((e.line, e.column), (1, 21));
        let e = parse_query("SELECT * FROM devices WHERE a = ").expect_err("short");
        assert!(e.message.contains("ends too early"), "{e}");
        let e = parse_query("SELECT * FROM devices WHERE group = 1").expect_err("reserved");
        assert!(e.message.contains("reserved"), "{e}");
        let e = parse_condition("nosuch(a) = 1").expect_err("function");
        assert!(e.message.contains("unknown function"), "{e}");
        assert!(parse_query("SELECT * FROM devices extra").is_err());
        assert!(parse_query("SELECT TOP x * FROM devices").is_err());
    }

    #[test]
    fn precedence() {
        let e = parse_condition("a = 1 OR b = 2 AND c = 3").expect("valid");
        match e {
            Expr::Binary(BinaryOp::Or, _, right) => {
                assert!(matches!(*right, Expr::Binary(BinaryOp::And, _, _)))
            }
            other => panic!("{other:?}"),
        }
        let e = parse_condition("1 + 2 * 3 = 7").expect("valid");
        assert!(matches!(e, Expr::Binary(BinaryOp::Eq, _, _)));
    }
}
