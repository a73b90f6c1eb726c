//! Compiling a parsed document into a [`Plan`], or refusing to: only documents that are certainly
//! valid, within every limit, and made only of the shapes [`super::run`] answers get one.
//!
//! The rules, each checked here because async-graphql would refuse a document that breaks it and
//! the compiled path must never answer a document that the schema refuses:
//! one query operation and no fragment; no directive anywhere; every field known to its type,
//! leaves without a selection and objects with one; no response key twice in a selection set
//! (so no field merging to get right); every argument known, once, of the right literal type or
//! a variable declared with exactly the argument's type; every declared variable used, declared
//! once, of a type we read, with a default of that type if any; depth and complexity (counted as
//! async-graphql counts them: fields nested, and every field once) within the schema's limits;
//! and the transport's own checks (`limits::check`, `document::check_document`) passed.
//! `__typename` and every other field are left to the schema.

use std::collections::HashSet;

use async_graphql::parser::types::{
    BaseType, DocumentOperations, ExecutableDocument, Field, OperationType, Selection,
    SelectionSet, VariableDefinition,
};
use async_graphql::Name;
use async_graphql_value::{ConstValue, Value};

use super::{
    Arg, ConnectionField, EdgeField, EventField, EventsField, Limits, PageInfoField, Plan,
    ProfileField, Root, Scalar, Selected, Type, Variable,
};

/// The plan of `document`, or `None` when the schema must answer it.
pub(super) fn compile(document: &ExecutableDocument, limits: &Limits) -> Option<Plan> {
    if !document.fragments.is_empty() {
        return None;
    }
    let (name, operation) = match &document.operations {
        DocumentOperations::Single(operation) => (None, operation),
        DocumentOperations::Multiple(operations) if operations.len() == 1 => {
            let (name, operation) = operations.iter().next()?;
            (Some(name.clone()), operation)
        }
        DocumentOperations::Multiple(_) => return None,
    };
    let operation = &operation.node;
    if operation.ty != OperationType::Query || !operation.directives.is_empty() {
        return None;
    }
    if super::super::limits::check(document, limits.admission.limits).is_err()
        || super::super::document::check_document(document, limits.admission.max_selections)
            .is_err()
    {
        return None;
    }
    let mut compiler = Compiler {
        variables: Vec::new(),
        used: HashSet::new(),
        fields: 0,
        depth: 0,
    };
    for definition in &operation.variable_definitions {
        compiler.declare(&definition.node)?;
    }
    let roots = compiler.selections(&operation.selection_set.node, 1, Compiler::root)?;
    if compiler.used.len() != compiler.variables.len()
        || compiler.fields > limits.max_complexity
        || compiler.depth > limits.max_depth
    {
        return None;
    }
    Some(Plan {
        operation_name: name,
        variables: compiler.variables,
        roots,
    })
}

struct Compiler {
    variables: Vec<Variable>,
    used: HashSet<Name>,
    /// Every field of the operation once (async-graphql's complexity without custom costs).
    fields: usize,
    /// The deepest nesting of fields, the root's fields at 1.
    depth: usize,
}

/// The arguments' types.
const ID: Type = Type {
    scalar: Scalar::Id,
    nullable: false,
};
const INT: Type = Type {
    scalar: Scalar::Int,
    nullable: true,
};
const STRING: Type = Type {
    scalar: Scalar::String,
    nullable: true,
};

impl Compiler {
    fn declare(&mut self, definition: &VariableDefinition) -> Option<()> {
        if !definition.directives.is_empty()
            || self
                .variables
                .iter()
                .any(|known| known.name == definition.name.node)
        {
            return None;
        }
        let ty = &definition.var_type.node;
        let BaseType::Named(base) = &ty.base else {
            return None;
        };
        let scalar = match (base.as_str(), ty.nullable) {
            // A nullable `ID` variable cannot stand for `id: ID!` without a default.
            ("ID", false) => Scalar::Id,
            ("Int", _) => Scalar::Int,
            ("String", _) => Scalar::String,
            _ => return None,
        };
        let declared = Type {
            scalar,
            nullable: ty.nullable,
        };
        let default = match &definition.default_value {
            Some(value) if !declared.admits(&value.node) => return None,
            default => default.as_ref().map(|value| value.node.clone()),
        };
        self.variables.push(Variable {
            name: definition.name.node.clone(),
            ty: declared,
            // What async-graphql uses when the request does not send the variable.
            absent: default.or_else(|| ty.nullable.then_some(ConstValue::Null)),
        });
        Some(())
    }

    /// The fields of `set`, each through `field`; no fragment, directive or repeated key.
    fn selections<T>(
        &mut self,
        set: &SelectionSet,
        depth: usize,
        mut field: impl FnMut(&mut Self, &Field, usize) -> Option<T>,
    ) -> Option<Vec<Selected<T>>> {
        if set.items.is_empty() {
            return None;
        }
        self.depth = self.depth.max(depth);
        let mut keys = HashSet::new();
        let mut selected = Vec::with_capacity(set.items.len());
        for item in &set.items {
            let Selection::Field(item) = &item.node else {
                return None;
            };
            let item = &item.node;
            if !item.directives.is_empty() {
                return None;
            }
            let key = item.response_key().node.clone();
            if !keys.insert(key.clone()) {
                return None;
            }
            self.fields += 1;
            let compiled = field(self, item, depth)?;
            selected.push(Selected {
                key: key.to_string(),
                field: compiled,
            });
        }
        Some(selected)
    }

    /// A leaf: no arguments, no selection.
    fn leaf<T>(field: &Field, value: T) -> Option<T> {
        (field.arguments.is_empty() && field.selection_set.node.items.is_empty()).then_some(value)
    }

    /// The arguments of `field`: each of `known` at most once and of its type, nothing else.
    fn arguments(&mut self, field: &Field, known: &[(&str, Type)]) -> Option<Vec<Arg>> {
        let mut args = vec![Arg::Absent; known.len()];
        for (name, value) in &field.arguments {
            let index = known
                .iter()
                .position(|(known, _)| *known == name.node.as_str())?;
            if !matches!(args[index], Arg::Absent) {
                return None;
            }
            args[index] = self.argument(&value.node, known[index].1)?;
        }
        Some(args)
    }

    fn argument(&mut self, value: &Value, expect: Type) -> Option<Arg> {
        match value {
            Value::Variable(name) => {
                let variable = self.variables.iter().find(|known| &known.name == name)?;
                if variable.ty.scalar != expect.scalar {
                    return None;
                }
                self.used.insert(name.clone());
                Some(Arg::Variable(name.clone()))
            }
            literal => {
                let constant = literal.clone().into_const()?;
                expect.admits(&constant).then_some(Arg::Literal(constant))
            }
        }
    }

    fn root(&mut self, field: &Field, depth: usize) -> Option<Root> {
        let nested = &field.selection_set.node;
        match field.name.node.as_str() {
            "profile" => {
                let mut args = self.arguments(field, &[("id", ID)])?;
                let id = args.pop()?;
                if matches!(id, Arg::Absent) {
                    return None;
                }
                let fields = self.selections(nested, depth + 1, Self::profile)?;
                Some(Root::Profile { id, fields })
            }
            "profiles" => {
                let mut args = self.arguments(field, &[("first", INT), ("after", STRING)])?;
                let after = args.pop()?;
                let first = args.pop()?;
                let fields = self.selections(nested, depth + 1, |compiler, field, depth| {
                    compiler.connection(field, depth, Self::profile)
                })?;
                // The nodes' events are read once for the page, for one selection of nodes: a
                // second `edges` or `node` under another alias is the schema's to answer.
                let nodes: usize = fields
                    .iter()
                    .map(|selected| match &selected.field {
                        ConnectionField::Edges(edges) => edges
                            .iter()
                            .filter(|edge| matches!(edge.field, EdgeField::Node(_)))
                            .count()
                            .max(1),
                        _ => 0,
                    })
                    .sum();
                if nodes > 1 {
                    return None;
                }
                Some(Root::Profiles {
                    first,
                    after,
                    fields,
                })
            }
            _ => None,
        }
    }

    fn profile(&mut self, field: &Field, depth: usize) -> Option<ProfileField> {
        let leaf = match field.name.node.as_str() {
            "id" => ProfileField::Id,
            "traits" => ProfileField::Traits,
            "channels" => ProfileField::Channels,
            "firstSeenAt" => ProfileField::FirstSeenAt,
            "lastSeenAt" => ProfileField::LastSeenAt,
            "eventCount" => ProfileField::EventCount,
            "createdAt" => ProfileField::CreatedAt,
            "events" => {
                let mut args = self.arguments(field, &[("first", INT), ("after", STRING)])?;
                let after = args.pop()?;
                let first = args.pop()?;
                let fields = self.selections(
                    &field.selection_set.node,
                    depth + 1,
                    |compiler, field, depth| compiler.connection(field, depth, Self::event),
                )?;
                return Some(ProfileField::Events(EventsField {
                    first,
                    after,
                    wants: EventsField::wants_of(&fields),
                    fields,
                }));
            }
            _ => return None,
        };
        Self::leaf(field, leaf)
    }

    fn event(&mut self, field: &Field, _depth: usize) -> Option<EventField> {
        let leaf = match field.name.node.as_str() {
            "id" => EventField::Id,
            "profileId" => EventField::ProfileId,
            "type" => EventField::Type,
            "name" => EventField::Name,
            "properties" => EventField::Properties,
            "context" => EventField::Context,
            "timestamp" => EventField::Timestamp,
            "receivedAt" => EventField::ReceivedAt,
            "messageId" => EventField::MessageId,
            "channel" => EventField::Channel,
            "sourceId" => EventField::SourceId,
            _ => return None,
        };
        Self::leaf(field, leaf)
    }

    /// A field of a connection (`edges`, `pageInfo`, `totalCount`) whose nodes are `node`s.
    fn connection<T>(
        &mut self,
        field: &Field,
        depth: usize,
        node: fn(&mut Self, &Field, usize) -> Option<T>,
    ) -> Option<ConnectionField<T>> {
        let nested = &field.selection_set.node;
        if !field.arguments.is_empty() {
            return None;
        }
        match field.name.node.as_str() {
            "totalCount" => Self::leaf(field, ConnectionField::TotalCount),
            "edges" => {
                let edges = self.selections(nested, depth + 1, |compiler, field, depth| {
                    if !field.arguments.is_empty() {
                        return None;
                    }
                    match field.name.node.as_str() {
                        "cursor" => Self::leaf(field, EdgeField::Cursor),
                        "node" => compiler
                            .selections(&field.selection_set.node, depth + 1, node)
                            .map(EdgeField::Node),
                        _ => None,
                    }
                })?;
                Some(ConnectionField::Edges(edges))
            }
            "pageInfo" => {
                let info = self.selections(nested, depth + 1, |_, field, _| {
                    match field.name.node.as_str() {
                        "hasNextPage" => Self::leaf(field, PageInfoField::HasNextPage),
                        "endCursor" => Self::leaf(field, PageInfoField::EndCursor),
                        _ => None,
                    }
                })?;
                Some(ConnectionField::PageInfo(info))
            }
            _ => None,
        }
    }
}
