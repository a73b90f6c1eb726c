//! Queries and mutations of the accounts section.

use async_graphql::{Context, Object, Result, ID};

use super::types::{
    ApiKey, ApiKeyScope, AuditEntryConnection, AuthPayload, CreatedApiKey, Me, Permission, Role,
    SignUpInput, SignUpPayload, SourceChannel, Tenant, User, UserConnection,
};
use super::{service_error, RequestContext};
use crate::auth::Principal;
use crate::service::{accounts, audit, AppState, RequestMeta, ServiceError};

/// What every resolver needs: the shared state and the request context.
pub(super) struct Env<'a> {
    pub state: &'a AppState,
    pub request: &'a RequestContext,
}

impl<'a> Env<'a> {
    pub fn of(ctx: &'a Context<'_>) -> Result<Env<'a>> {
        Ok(Env {
            state: ctx.data::<AppState>()?,
            request: ctx.data::<RequestContext>()?,
        })
    }

    /// The principal, or the reason the credentials sent were refused.
    pub fn principal(&self) -> Result<Option<&'a Principal>> {
        if let Some(reason) = &self.request.auth_error {
            return Err(service_error(ServiceError::Unauthenticated(reason.clone())));
        }
        Ok(self.request.principal.as_ref())
    }

    pub fn meta(&self) -> &'a RequestMeta {
        &self.request.meta
    }
}

/// Turns a service result into a GraphQL result with the contract's error codes.
pub(super) trait ServiceResultExt<T> {
    fn gql(self) -> Result<T>;
}

impl<T> ServiceResultExt<T> for Result<T, ServiceError> {
    fn gql(self) -> Result<T> {
        self.map_err(service_error)
    }
}

#[derive(Default)]
pub struct AccountsQuery;

#[Object]
impl AccountsQuery {
    async fn me(&self, ctx: &Context<'_>) -> Result<Me> {
        let env = Env::of(ctx)?;
        accounts::me(env.state, env.principal()?)
            .await
            .gql()
            .map(Me::from)
    }

    async fn tenant(&self, ctx: &Context<'_>) -> Result<Tenant> {
        let env = Env::of(ctx)?;
        accounts::tenant(env.state, env.principal()?)
            .await
            .gql()
            .map(Tenant::from)
    }

    async fn users(
        &self,
        ctx: &Context<'_>,
        #[graphql(default = 50)] first: Option<i32>,
        after: Option<String>,
    ) -> Result<UserConnection> {
        let env = Env::of(ctx)?;
        accounts::users(env.state, env.principal()?, first, after.as_deref())
            .await
            .gql()
            .map(UserConnection::from)
    }

    async fn roles(&self, ctx: &Context<'_>) -> Result<Vec<Role>> {
        let env = Env::of(ctx)?;
        Ok(accounts::roles(env.state, env.principal()?)
            .await
            .gql()?
            .into_iter()
            .map(Role::from)
            .collect())
    }

    async fn api_keys(&self, ctx: &Context<'_>) -> Result<Vec<ApiKey>> {
        let env = Env::of(ctx)?;
        Ok(accounts::api_keys(env.state, env.principal()?)
            .await
            .gql()?
            .into_iter()
            .map(ApiKey::from)
            .collect())
    }

    async fn audit_log(
        &self,
        ctx: &Context<'_>,
        #[graphql(default = 50)] first: Option<i32>,
        after: Option<String>,
    ) -> Result<AuditEntryConnection> {
        let env = Env::of(ctx)?;
        audit::list(env.state, env.principal()?, first, after.as_deref())
            .await
            .gql()
            .map(AuditEntryConnection::from)
    }
}

#[derive(Default)]
pub struct AccountsMutation;

#[Object]
impl AccountsMutation {
    /// Creates a tenant and its owner (pending) and emails the owner an activation link.
    async fn sign_up(&self, ctx: &Context<'_>, input: SignUpInput) -> Result<SignUpPayload> {
        let env = Env::of(ctx)?;
        let (tenant, user, _token) = accounts::sign_up(
            env.state,
            env.meta(),
            accounts::SignUpCommand {
                tenant_name: input.tenant_name,
                tenant_slug: input.tenant_slug,
                email: input.email,
            },
        )
        .await
        .gql()?;
        Ok(SignUpPayload {
            tenant: tenant.into(),
            user: user.into(),
        })
    }

    async fn activate_account(
        &self,
        ctx: &Context<'_>,
        token: String,
        password: String,
    ) -> Result<AuthPayload> {
        let env = Env::of(ctx)?;
        accounts::activate_account(env.state, env.meta(), &token, &password)
            .await
            .gql()
            .map(AuthPayload::from)
    }

    async fn login(
        &self,
        ctx: &Context<'_>,
        tenant_slug: String,
        email: String,
        password: String,
    ) -> Result<AuthPayload> {
        let env = Env::of(ctx)?;
        accounts::login(env.state, env.meta(), &tenant_slug, &email, &password)
            .await
            .gql()
            .map(AuthPayload::from)
    }

    async fn refresh_session(
        &self,
        ctx: &Context<'_>,
        refresh_token: String,
    ) -> Result<AuthPayload> {
        let env = Env::of(ctx)?;
        accounts::refresh_session(env.state, env.meta(), &refresh_token)
            .await
            .gql()
            .map(AuthPayload::from)
    }

    /// Always returns true, whether or not the account exists.
    async fn request_password_reset(
        &self,
        ctx: &Context<'_>,
        tenant_slug: String,
        email: String,
    ) -> Result<bool> {
        let env = Env::of(ctx)?;
        accounts::request_password_reset(env.state, env.meta(), &tenant_slug, &email)
            .await
            .gql()
    }

    async fn reset_password(
        &self,
        ctx: &Context<'_>,
        token: String,
        password: String,
    ) -> Result<AuthPayload> {
        let env = Env::of(ctx)?;
        accounts::reset_password(env.state, env.meta(), &token, &password)
            .await
            .gql()
            .map(AuthPayload::from)
    }

    /// Creates a pending user with these roles and emails an activation link.
    async fn invite_user(
        &self,
        ctx: &Context<'_>,
        email: String,
        roles: Vec<String>,
    ) -> Result<User> {
        let env = Env::of(ctx)?;
        accounts::invite_user(env.state, env.principal()?, env.meta(), &email, &roles)
            .await
            .gql()
            .map(User::from)
    }

    async fn set_user_roles(
        &self,
        ctx: &Context<'_>,
        user_id: ID,
        roles: Vec<String>,
    ) -> Result<User> {
        let env = Env::of(ctx)?;
        accounts::set_user_roles(env.state, env.principal()?, env.meta(), &user_id, &roles)
            .await
            .gql()
            .map(User::from)
    }

    async fn deactivate_user(&self, ctx: &Context<'_>, user_id: ID) -> Result<User> {
        let env = Env::of(ctx)?;
        accounts::deactivate_user(env.state, env.principal()?, env.meta(), &user_id)
            .await
            .gql()
            .map(User::from)
    }

    async fn create_role(
        &self,
        ctx: &Context<'_>,
        name: String,
        permissions: Vec<Permission>,
    ) -> Result<Role> {
        let env = Env::of(ctx)?;
        let permissions: Vec<domain::Permission> =
            permissions.into_iter().map(Into::into).collect();
        accounts::create_role(env.state, env.principal()?, env.meta(), &name, &permissions)
            .await
            .gql()
            .map(Role::from)
    }

    async fn delete_role(&self, ctx: &Context<'_>, name: String) -> Result<bool> {
        let env = Env::of(ctx)?;
        accounts::delete_role(env.state, env.principal()?, env.meta(), &name)
            .await
            .gql()
    }

    /// The secret is returned here once and never again.
    async fn create_api_key(
        &self,
        ctx: &Context<'_>,
        name: String,
        scope: ApiKeyScope,
        #[graphql(default_with = "SourceChannel::Other")] channel: SourceChannel,
    ) -> Result<CreatedApiKey> {
        let env = Env::of(ctx)?;
        let (api_key, secret) = accounts::create_api_key(
            env.state,
            env.principal()?,
            env.meta(),
            &name,
            scope.into(),
            channel.into(),
        )
        .await
        .gql()?;
        Ok(CreatedApiKey {
            api_key: api_key.into(),
            secret,
        })
    }

    async fn revoke_api_key(&self, ctx: &Context<'_>, id: ID) -> Result<ApiKey> {
        let env = Env::of(ctx)?;
        accounts::revoke_api_key(env.state, env.principal()?, env.meta(), &id)
            .await
            .gql()
            .map(ApiKey::from)
    }
}
