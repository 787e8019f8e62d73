//! The function table: names resolved to [`Func`] at parse time, with arities.

macro_rules! funcs {
    ($( $variant:ident = $name:literal ($min:literal, $max:literal) ),* $(,)?) => {
        /// A FHIRPath function, resolved from its name when the expression is parsed.
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum Func {
            $( $variant, )*
            /// A name that is not a known function (an error at check and evaluation time).
            Unknown,
        }

        impl Func {
            pub fn from_name(name: &str) -> Func {
                match name {
                    $( $name => Func::$variant, )*
                    _ => Func::Unknown,
                }
            }

            /// (minimum, maximum) number of arguments.
            pub fn arity(self) -> (usize, usize) {
                match self {
                    $( Func::$variant => ($min, $max), )*
                    Func::Unknown => (0, usize::MAX),
                }
            }

            pub fn name(self) -> &'static str {
                match self {
                    $( Func::$variant => $name, )*
                    Func::Unknown => "?",
                }
            }
        }
    };
}

funcs! {
    Empty = "empty"(0, 0),
    Exists = "exists"(0, 1),
    All = "all"(1, 1),
    AllTrue = "allTrue"(0, 0),
    AnyTrue = "anyTrue"(0, 0),
    AllFalse = "allFalse"(0, 0),
    AnyFalse = "anyFalse"(0, 0),
    SubsetOf = "subsetOf"(1, 1),
    SupersetOf = "supersetOf"(1, 1),
    Count = "count"(0, 0),
    Distinct = "distinct"(0, 0),
    IsDistinct = "isDistinct"(0, 0),
    Where = "where"(1, 1),
    Select = "select"(1, 1),
    Repeat = "repeat"(1, 1),
    OfType = "ofType"(1, 1),
    Single = "single"(0, 0),
    First = "first"(0, 0),
    Last = "last"(0, 0),
    Tail = "tail"(0, 0),
    Skip = "skip"(1, 1),
    Take = "take"(1, 1),
    Intersect = "intersect"(1, 1),
    Exclude = "exclude"(1, 1),
    Union = "union"(1, 1),
    Combine = "combine"(1, 1),
    Iif = "iif"(2, 3),
    ToBoolean = "toBoolean"(0, 0),
    ConvertsToBoolean = "convertsToBoolean"(0, 0),
    ToInteger = "toInteger"(0, 0),
    ConvertsToInteger = "convertsToInteger"(0, 0),
    ToDecimal = "toDecimal"(0, 0),
    ConvertsToDecimal = "convertsToDecimal"(0, 0),
    ToStringFn = "toString"(0, 0),
    ConvertsToString = "convertsToString"(0, 0),
    ToDate = "toDate"(0, 0),
    ConvertsToDate = "convertsToDate"(0, 0),
    ToDateTime = "toDateTime"(0, 0),
    ConvertsToDateTime = "convertsToDateTime"(0, 0),
    ToTime = "toTime"(0, 0),
    ConvertsToTime = "convertsToTime"(0, 0),
    ToQuantity = "toQuantity"(0, 1),
    ConvertsToQuantity = "convertsToQuantity"(0, 1),
    IndexOf = "indexOf"(1, 1),
    Substring = "substring"(1, 2),
    StartsWith = "startsWith"(1, 1),
    EndsWith = "endsWith"(1, 1),
    Contains = "contains"(1, 1),
    Upper = "upper"(0, 0),
    Lower = "lower"(0, 0),
    Replace = "replace"(2, 2),
    Matches = "matches"(1, 1),
    MatchesFull = "matchesFull"(1, 1),
    ReplaceMatches = "replaceMatches"(2, 2),
    Length = "length"(0, 0),
    ToChars = "toChars"(0, 0),
    Split = "split"(1, 1),
    Join = "join"(0, 1),
    Trim = "trim"(0, 0),
    Encode = "encode"(1, 1),
    Decode = "decode"(1, 1),
    Escape = "escape"(1, 1),
    Unescape = "unescape"(1, 1),
    Abs = "abs"(0, 0),
    Ceiling = "ceiling"(0, 0),
    Exp = "exp"(0, 0),
    Floor = "floor"(0, 0),
    Ln = "ln"(0, 0),
    Log = "log"(1, 1),
    Power = "power"(1, 1),
    Round = "round"(0, 1),
    Sqrt = "sqrt"(0, 0),
    Truncate = "truncate"(0, 0),
    Children = "children"(0, 0),
    Descendants = "descendants"(0, 0),
    Trace = "trace"(1, 2),
    Now = "now"(0, 0),
    Today = "today"(0, 0),
    TimeOfDay = "timeOfDay"(0, 0),
    Aggregate = "aggregate"(1, 2),
    Sort = "sort"(0, 9),
    Not = "not"(0, 0),
    Is = "is"(1, 1),
    As = "as"(1, 1),
    Type = "type"(0, 0),
    Extension = "extension"(1, 1),
    Resolve = "resolve"(0, 0),
    GetResourceKey = "getResourceKey"(0, 0),
    GetReferenceKey = "getReferenceKey"(0, 1),
    HasValue = "hasValue"(0, 0),
    GetValue = "getValue"(0, 0),
    MemberOf = "memberOf"(1, 1),
    LowBoundary = "lowBoundary"(0, 1),
    HighBoundary = "highBoundary"(0, 1),
    Precision = "precision"(0, 0),
    Comparable = "comparable"(1, 1),
    ConformsTo = "conformsTo"(1, 1),
    HtmlChecks = "htmlChecks"(0, 0),
    DefineVariable = "defineVariable"(1, 2),
}
