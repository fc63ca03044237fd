from django.urls import path

from tests.webapps.djangosite import views

urlpatterns = [path("signup", views.signup)]
