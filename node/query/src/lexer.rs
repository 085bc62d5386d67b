//! Tokens of the query language.

use crate::QueryError;

/// A token with its position.
#[derive(Debug, Clone, PartialEq)]
pub struct Token {
    /// What it is.
    pub kind: Kind,
    /// 1-based line.
    pub line: usize,
    /// 1-based column.
    pub column: usize,
}

/// Token kinds.
#[derive(Debug, Clone, PartialEq)]
pub enum Kind {
    /// A name: `tags`, `$body`, `[[group]]` (quoted names are never keywords).
    Ident(String, bool),
    /// A number.
    Number(f64),
    /// A string literal.
    Str(String),
    /// Punctuation and operators.
    Sym(&'static str),
    /// End of input.
    End,
}

const SYMBOLS: [&str; 19] = [
    "<=", ">=", "<>", "!=", "(", ")", "[", "]", ",", ".", "*", "+", "-", "/", "%", "=", "<", ">",
    "!",
];

/// Splits `text` into tokens.
pub fn tokenize(text: &str) -> Result<Vec<Token>, QueryError> {
    let chars: Vec<char> = text.chars().collect();
    let mut tokens = Vec::new();
    let (mut i, mut line, mut col) = (0usize, 1usize, 1usize);
    let advance = |i: &mut usize, line: &mut usize, col: &mut usize, c: char| {
        *i += 1;
        if c == '\n' {
            *line += 1;
            *col = 1;
        } else {
            *col += 1;
        }
    };
    while i < chars.len() {
        let c = chars[i];
        if c.is_whitespace() {
            advance(&mut i, &mut line, &mut col, c);
            continue;
        }
        let (start_line, start_col) = (line, col);
        let push = |tokens: &mut Vec<Token>, kind| {
            tokens.push(Token {
                kind,
                line: start_line,
                column: start_col,
            })
        };
        // [[quoted name]]
        if c == '[' && chars.get(i + 1) == Some(&'[') {
            let mut j = i + 2;
            let mut name = String::new();
            while j + 1 < chars.len() && !(chars[j] == ']' && chars[j + 1] == ']') {
                name.push(chars[j]);
                j += 1;
            }
            if j + 1 >= chars.len() {
                return Err(QueryError::at(
                    "unterminated [[name]]",
                    start_line,
                    start_col,
                ));
            }
            for _ in 0..(j + 2 - i) {
                advance(&mut i, &mut line, &mut col, ' ');
            }
            push(&mut tokens, Kind::Ident(name, true));
            continue;
        }
        if c == '\'' || c == '"' {
            let quote = c;
            advance(&mut i, &mut line, &mut col, c);
            let mut s = String::new();
            loop {
                let Some(&d) = chars.get(i) else {
                    return Err(QueryError::at("unterminated string", start_line, start_col));
                };
                advance(&mut i, &mut line, &mut col, d);
                if d == quote {
                    break;
                }
                if d == '\\' {
                    let Some(&e) = chars.get(i) else {
                        return Err(QueryError::at("unterminated string", start_line, start_col));
                    };
                    advance(&mut i, &mut line, &mut col, e);
                    match e {
                        'u' => {
                            let hex: String = chars.iter().skip(i).take(4).collect();
                            let code = u32::from_str_radix(&hex, 16)
                                .ok()
                                .filter(|_| hex.len() == 4)
                                .and_then(char::from_u32)
                                .ok_or_else(|| QueryError::at("bad \\u escape", line, col))?;
                            for _ in 0..4 {
                                advance(&mut i, &mut line, &mut col, ' ');
                            }
                            s.push(code);
                        }
                        'n' => s.push('\n'),
                        't' => s.push('\t'),
                        'r' => s.push('\r'),
                        other => s.push(other),
                    }
                } else {
                    s.push(d);
                }
            }
            push(&mut tokens, Kind::Str(s));
            continue;
        }
        if c.is_ascii_digit() || (c == '.' && chars.get(i + 1).is_some_and(char::is_ascii_digit)) {
            let mut j = i;
            let value = if c == '0' && matches!(chars.get(i + 1), Some('x') | Some('X')) {
                j += 2;
                let digits: String = chars[j..]
                    .iter()
                    .take_while(|d| d.is_ascii_hexdigit())
                    .collect();
                j += digits.len();
                i64::from_str_radix(&digits, 16)
                    .map(|v| v as f64)
                    .map_err(|_| QueryError::at("bad hexadecimal number", start_line, start_col))?
            } else {
                while j < chars.len() && (chars[j].is_ascii_digit() || chars[j] == '.') {
                    j += 1;
                }
                if j < chars.len() && matches!(chars[j], 'e' | 'E') {
                    j += 1;
                    if j < chars.len() && matches!(chars[j], '+' | '-') {
                        j += 1;
                    }
                    while j < chars.len() && chars[j].is_ascii_digit() {
                        j += 1;
                    }
                }
                let text: String = chars[i..j].iter().collect();
                text.parse::<f64>().map_err(|_| {
                    QueryError::at(format!("bad number {text}"), start_line, start_col)
                })?
            };
            for _ in 0..(j - i) {
                advance(&mut i, &mut line, &mut col, ' ');
            }
            push(&mut tokens, Kind::Number(value));
            continue;
        }
        if c.is_alphabetic() || c == '_' || c == '$' {
            let mut j = i;
            while j < chars.len()
                && (chars[j].is_alphanumeric() || matches!(chars[j], '_' | '$' | '-'))
            {
                // A '-' belongs to a name only inside it (`iothub-connection-device-id`), never
                // as an operator between two names with spaces.
                if chars[j] == '-'
                    && !(j + 1 < chars.len() && chars[j + 1].is_alphanumeric() && j > i)
                {
                    break;
                }
                j += 1;
            }
            let name: String = chars[i..j].iter().collect();
            for _ in 0..(j - i) {
                advance(&mut i, &mut line, &mut col, ' ');
            }
            push(&mut tokens, Kind::Ident(name, false));
            continue;
        }
        let rest: String = chars[i..chars.len().min(i + 2)].iter().collect();
        let Some(sym) = SYMBOLS.iter().find(|s| rest.starts_with(**s)) else {
            return Err(QueryError::at(
                format!("unexpected character {c:?}"),
                start_line,
                start_col,
            ));
        };
        for _ in 0..sym.len() {
            advance(&mut i, &mut line, &mut col, ' ');
        }
        push(&mut tokens, Kind::Sym(sym));
    }
    tokens.push(Token {
        kind: Kind::End,
        line,
        column: col,
    });
    Ok(tokens)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kinds(s: &str) -> Vec<Kind> {
        tokenize(s)
            .expect("valid")
            .into_iter()
            .map(|t| t.kind)
            .collect()
    }

    #[test]
    fn tokens() {
        assert_eq!(
            kinds("a.b >= 0x1F AND 'it\\'s' <> \"x\""),
            vec![
                Kind::Ident("a".into(), false),
                Kind::Sym("."),
                Kind::Ident("b".into(), false),
                Kind::Sym(">="),
                Kind::Number(31.0),
                Kind::Ident("AND".into(), false),
                Kind::Str("it's".into()),
                Kind::Sym("<>"),
                Kind::Str("x".into()),
                Kind::End
            ]
        );
        assert_eq!(
            kinds("tags.[[group]]")[2],
            Kind::Ident("group".into(), true)
        );
        assert_eq!(kinds("$body.x-y")[2], Kind::Ident("x-y".into(), false));
        assert_eq!(kinds("a - b")[1], Kind::Sym("-"));
        assert_eq!(kinds("1.5e3")[0], Kind::Number(1500.0));
    }

    #[test]
    fn errors_have_positions() {
        let e = tokenize("a = 'open").expect_err("unterminated");
        assert_eq!((e.line, e.column), (1, 5));
        let e = tokenize("a\n = #").expect_err("bad char");
        assert_eq!((e.line, e.column), (2, 4));
    }
}
