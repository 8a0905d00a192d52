"""convfactor.train"""
